"""ray_cluster.yaml as `ray up` reads it, checked offline with Ray's own code: prepare_config (defaults merged, docker
checked, per-type bounds filled) then validate_config (Ray's JSON schema and its cross-field rules)."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())


def test_ray_up_takes_it_as_it_is(raw):
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    import jsonschema

    jsonschema.validate(raw, schema)  # the file itself, before Ray fills in its defaults
    validate_config(prepare_config(copy.deepcopy(raw)))  # what `ray up` runs before it asks AWS for anything


def test_a_worker_type_without_resources_is_refused(raw):
    # the check the old file failed: Ray's schema needs `resources` on every node type (offline, AWS fills it in
    # from the instance type only when it can reach AWS)
    bad = copy.deepcopy(raw)
    del bad["available_node_types"]["gpu_worker"]["resources"]
    with pytest.raises(Exception, match="'resources' is a required property"):
        validate_config(prepare_config(bad))


def test_node_types_resources_bounds_and_instance_profiles(raw):
    types = raw["available_node_types"]
    assert types[raw["head_node_type"]]["resources"] == {"CPU": 0}  # the driver only
    assert types["cpu_worker"]["resources"]["CPU"] > 0 and "GPU" not in types["cpu_worker"]["resources"]
    assert types["gpu_worker"]["resources"]["GPU"] >= 1 and types["gpu_worker"]["min_workers"] == 0
    for name, t in types.items():  # every node reaches S3 with credentials of its own
        assert t["node_config"]["IamInstanceProfile"].get("Name") or t["node_config"]["IamInstanceProfile"]["Arn"]
        if name != raw["head_node_type"]:
            assert 0 <= t["min_workers"] <= t["max_workers"] <= raw["max_workers"]


def test_python_311_and_the_projects_ray_everywhere(raw):
    pins = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines() if "==" in line)
    assert pins["ray"] == ray.__version__
    images = [raw["docker"]["image"], raw["available_node_types"]["gpu_worker"]["docker"]["worker_image"]]
    assert all(i.startswith(f"rayproject/ray:{ray.__version__}-py311-") for i in images)
    setup = " ".join(raw["setup_commands"])
    assert "-c ~/mm1data_constraints.txt" in setup and f"ray[default]=={ray.__version__}" in setup


def test_no_mount_holds_the_checkout_or_a_venv(raw):
    # ray up hashes every file under a mounted folder and rsyncs it: only the wheel folder, the pins and the token
    for remote, local in raw["file_mounts"].items():
        path = (ROOT / os.path.expanduser(local)).resolve()
        assert path != ROOT and path not in ROOT.parents, (remote, local)  # not the checkout, nor a folder above it
        assert not (path / ".venv").exists(), (remote, local)
    assert any("mm1data-*.whl" in c for c in raw["setup_commands"])


def test_every_node_starts_ray_with_token_auth(raw):
    starts = raw["head_start_ray_commands"] + raw["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token ray start" in c for c in starts if "ray start" in c)
    assert raw["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
