"""Run configs: YAML + --set overrides, unknown keys named, the shipped pipeline config loads."""

from __future__ import annotations

import pytest

from mm1data.config import ConfigError
from mm1data.pipelines import load_run_config


def test_shipped_caption_config_and_overrides():
    _, cfg = load_run_config(
        "pipelines/caption.yaml",
        ["download.timeout_s=5", "clip.pretrained=null", "filters=[]", "input.extra_cols=[id]"],
    )
    assert cfg.download.timeout_s == 5.0 and cfg.clip.pretrained is None
    assert cfg.filters == () and cfg.input.extra_cols == ("id",)
    assert cfg.filters != load_run_config("pipelines/caption.yaml")[1].filters


def test_dedup_reference_list_override():
    _, cfg = load_run_config("pipelines/caption.yaml", ["dedup.reference=[s3://b/captions, /data/eval.parquet]"])
    assert cfg.dedup.reference == ("s3://b/captions", "/data/eval.parquet") and cfg.dedup.max_distance == 8
    _, cfg = load_run_config("pipelines/interleaved.yaml", ["dedup.reference=[a]", "dedup.max_distance=4"])
    assert cfg.dedup.reference == ("a",) and cfg.dedup.max_distance == 4
    with pytest.raises(ConfigError, match="dedup.max_distance"):
        load_run_config("pipelines/caption.yaml", ["dedup.max_distance=40"])
    with pytest.raises(ConfigError, match="dedup.reference"):
        load_run_config("pipelines/caption.yaml", ["dedup.reference=oops"])


@pytest.mark.parametrize(
    "override,match",
    [
        ("download.timeoutt=5", "unknown config key 'download.timeoutt'"),
        ("nope=1", "unknown config key 'nope'"),
        ("download.timeout_s=abc", "download.timeout_s"),
        ("download.resize_mode=stretch", "resize_mode"),
    ],
)
def test_bad_overrides_name_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        load_run_config("pipelines/caption.yaml", [override])


# --- hostile YAML -------------------------------------------------------------------------------------------------


def laughs(levels: int = 9, width: int = 9, key: str = "x") -> str:
    """A billion laughs: a few hundred bytes whose aliases expand to width**levels strings."""
    lines = [f"l0: &l0 [{', '.join(['lol'] * width)}]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]" for i in range(1, levels)]
    lines.append(f"{key}: *l{levels - 1}")
    return "\n".join(lines) + "\n"


HOSTILE = {
    "billion laughs": laughs(),
    "laughs in a mapping": "a: &a {k: [v, v, v, v, v, v, v, v]}\n"
    + "".join(
        f"b{i}: &b{i} {{p: *{'a' if i == 0 else f'b{i - 1}'}, q: *{'a' if i == 0 else f'b{i - 1}'}}}\n"
        for i in range(40)
    ),
    "one long string many times": "s: &s " + "x" * 100_000 + "\n" + "l: [" + ", ".join(["*s"] * 200) + "]\n",
    "recursive alias": "a: &a [1, *a]\n",
    "python tag": "a: !!python/object/apply:os.system [echo pwned]\n",
    "python name tag": "a: !!python/name:os.system\n",
    "invalid": "a: [1, 2\n",
    "tab indentation": "a:\n\t- 1\n",
    "huge integer": "a: " + "9" * 6000 + "\n",
    "deep nesting": "a: " + "[" * 50_000 + "]" * 50_000 + "\n",
    "too big": "a: '" + "x" * (5 << 20) + "'\n",
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_every_yaml_read_refuses_hostile_documents_quickly(case, tmp_path):
    """Run configs, filter chains and manifests share one bounded loader: a clear ConfigError naming the file,
    never gigabytes of expansion, a Python object or a traceback; the error message stays short."""
    from mm1data.config import load_yaml
    from mm1data.filters import parse_chain
    from mm1data.manifest import load_manifest

    text = HOSTILE[case]
    path = tmp_path / "hostile.yaml"
    path.write_text(text)
    for read in (load_run_config, parse_chain, load_manifest):
        with pytest.raises(ConfigError, match="hostile.yaml") as e:
            read(str(path))
        assert len(str(e.value)) < 1200
    with pytest.raises(ConfigError) as e:
        load_yaml(text, "inline")
    assert len(str(e.value)) < 1200


def test_yaml_anchors_within_bounds_still_work(tmp_path):
    from mm1data.config import load_yaml

    assert load_yaml("a: &x {b: 1}\nc: *x\nd: {<<: *x, e: 2}\n", "x") == {
        "a": {"b": 1},
        "c": {"b": 1},
        "d": {"b": 1, "e": 2},
    }
    assert len(load_yaml(laughs(levels=4), "x")["x"]) == 9  # 6,561 strings: fine


@pytest.mark.parametrize(
    "value",
    [
        "!!python/object/apply:os.system [echo pwned]",
        "!!python/object:mm1data.config.ConfigError {}",
        "[1, 2",
        "{a: 1",
        "'unclosed",
        "!!binary ...",
        "9" * 6000,
        "&a [*a]",
    ],
)
def test_set_with_a_tag_or_invalid_yaml_is_an_error_not_a_traceback(value, tmp_path, capsys):
    from mm1data.cli import main

    code = main(
        [
            "run",
            "pipelines/caption.yaml",
            "--input",
            "x",
            "--output",
            str(tmp_path),
            "--set",
            f"download.timeout_s={value}",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("mm1data: error: ") and "Traceback" not in err
    assert "'download.timeout_s'" in err
    assert len(err) < 1200


def test_error_messages_echo_values_bounded():
    """A long or deeply shared value is shown shortened: the message stays small whatever the input holds."""
    from mm1data.config import from_dict
    from mm1data.pipelines.caption import Config

    big = ["x" * 1000] * 10_000
    for raw in (
        {"download": {"timeout_s": big}},
        {"download": {"resize_mode": "y" * 100_000}},
        {"download": big},
        {"z" * 100_000: 1},
        {3: 1},  # a YAML key that is not a string
        {"filters": [{"name": "caption_words", "min": 1, "q" * 100_000: 1}]},
    ):
        with pytest.raises(ConfigError) as e:
            cfg = from_dict(Config, raw)
            from mm1data.filters import parse_chain

            parse_chain(cfg.filters)
        assert len(str(e.value)) < 1200, str(e.value)[:200]


# --- numeric ranges --------------------------------------------------------------------------------------------------

BAD_VALUES = [
    # (pipeline, override, the key the error names)
    ("caption", "download.timeout_s=0", "download.timeout_s"),
    ("caption", "download.timeout_s=-1", "download.timeout_s"),
    ("caption", "download.timeout_s=.nan", "download.timeout_s"),
    ("caption", "download.timeout_s=.inf", "download.timeout_s"),
    ("caption", "download.retries=-1", "download.retries"),
    ("caption", "download.backoff_s=-0.5", "download.backoff_s"),
    ("caption", "download.backoff_s=.nan", "download.backoff_s"),
    ("caption", "download.max_backoff_s=-1", "download.max_backoff_s"),
    ("caption", "download.threads=0", "download.threads"),
    ("caption", "download.workers=-1", "download.workers"),
    ("caption", "download.batch_size=0", "download.batch_size"),
    ("caption", "download.max_bytes=0", "download.max_bytes"),
    ("caption", "download.max_redirects=-1", "download.max_redirects"),
    ("caption", "download.max_pixels=0", "download.max_pixels"),
    ("caption", "download.image_size=0", "download.image_size"),
    ("caption", "download.encode_quality=101", "download.encode_quality"),
    ("caption", "download.encode_quality=-1", "download.encode_quality"),
    ("caption", "download.resize_mode=stretch", "download.resize_mode"),
    ("caption", "download.encode_format=gif", "download.encode_format"),
    ("caption", "shards.samples_per_shard=0", "shards.samples_per_shard"),
    ("caption", "shards.bytes_per_shard=-5", "shards.bytes_per_shard"),
    ("caption", "shards.workers=-1", "shards.workers"),
    ("caption", "clip.batch_size=0", "clip.batch_size"),
    ("caption", "clip.workers=0", "clip.workers"),
    ("caption", "clip.num_gpus=-1", "clip.num_gpus"),
    ("caption", "clip.num_gpus=.nan", "clip.num_gpus"),
    ("caption", "clip.precision=int4", "clip.precision"),
    ("caption", "input.rows_per_unit=0", "input.rows_per_unit"),
    ("caption", "input.format=xml", "input.format"),
    ("text", "input.rows_per_unit=-3", "input.rows_per_unit"),
    ("text", "input.max_bytes=0", "input.max_bytes"),
    ("text", "shards.samples_per_shard=0", "shards.samples_per_shard"),
    ("text", "dedup.minhash.bands=0", "dedup.minhash.bands"),
    ("text", "dedup.minhash.rows=0", "dedup.minhash.rows"),
    ("text", "dedup.minhash.ngram=0", "dedup.minhash.ngram"),
    ("text", "dedup.minhash.ngram=1000000000", "dedup.minhash.ngram"),
    ("text", "dedup.minhash.bands=1000", "dedup.minhash.bands"),  # 1000 x 8 permutations
    ("text", "dedup.minhash.seed=-1", "dedup.minhash.seed"),
    ("interleaved", "relevance.min=.nan", "relevance.min"),
    ("interleaved", "relevance.min=2", "relevance.min"),
    ("interleaved", "dedup.max_image_docs=-1", "dedup.max_image_docs"),
    ("interleaved", "input.max_images=0", "input.max_images"),
    ("interleaved", "batch_size=0", "batch_size"),
]


@pytest.mark.parametrize("kind,override,key", BAD_VALUES, ids=[o for _, o, _ in BAD_VALUES])
def test_out_of_range_values_are_config_errors_naming_the_key_and_range(kind, override, key):
    with pytest.raises(ConfigError) as e:
        load_run_config(f"pipelines/{kind}.yaml", [override])
    msg = str(e.value)
    assert f"config key '{key}' must be " in msg
    assert any(word in msg for word in (">", "<=", "one of")), msg  # the allowed range or set


def test_range_messages_say_integer_or_finite_number():
    with pytest.raises(ConfigError, match=r"'download.threads' must be an integer >= 1, got 0"):
        load_run_config("pipelines/caption.yaml", ["download.threads=0"])
    with pytest.raises(ConfigError, match=r"'download.timeout_s' must be a finite number > 0, got nan"):
        load_run_config("pipelines/caption.yaml", ["download.timeout_s=.nan"])
    with pytest.raises(ConfigError, match=r"'download.encode_quality' must be an integer >= 0 and <= 100, got 101"):
        load_run_config("pipelines/caption.yaml", ["download.encode_quality=101"])
    # the edges of each range are accepted
    _, cfg = load_run_config(
        "pipelines/caption.yaml",
        [
            "download.retries=0",
            "download.workers=0",
            "download.encode_quality=0",
            "clip.num_gpus=null",
            "shards.workers=0",
        ],
    )
    assert cfg.download.retries == 0 and cfg.clip.num_gpus is None


@pytest.mark.parametrize(
    "sequence,key",
    [
        ({"max_tokens": 0}, "sequence.max_tokens"),
        ({"max_tokens": -1}, "sequence.max_tokens"),
        ({"max_images": 0}, "sequence.max_images"),
        ({"image_tokens": 0}, "sequence.image_tokens"),
        ({"image_size": 0}, "sequence.image_size"),
        ({"max_tokens": 100, "image_tokens": 144}, "sequence.image_tokens"),
        ({"max_tokens": 145, "image_tokens": 144}, "sequence.image_tokens"),  # bos + image + eos do not fit
    ],
)
def test_manifest_sequence_ranges(sequence, key):
    from mm1data.manifest import Manifest

    with pytest.raises(ConfigError, match=f"config key '{key}' must be"):
        Manifest.from_dict({"name": "m", "sources": [{"name": "a", "index": "a", "weight": 1}], "sequence": sequence})
    assert (
        Manifest.from_dict(
            {
                "name": "m",
                "sources": [{"name": "a", "index": "a", "weight": 1}],
                "sequence": {"max_tokens": 146, "image_tokens": 144},
            }
        ).sequence.max_tokens
        == 146
    )


@pytest.mark.parametrize(
    "entry,match",
    [
        ({"name": "caption_words", "min": ".nan"}, "min must be a number"),
        ({"name": "caption_words", "min": float("nan")}, "min must be a number"),
        ({"name": "caption_words", "max": "ten"}, "max must be a number"),
        ({"name": "caption_words", "min": 5, "max": 2}, "min 5 is above max 2"),
        ({"name": ["caption_words"]}, "a filter name must be a string"),
    ],
)
def test_filter_thresholds_must_be_numbers(entry, match):
    from mm1data.filters import parse_chain

    with pytest.raises(ConfigError, match=match):
        parse_chain([entry])
