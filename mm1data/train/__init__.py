"""The compact MM1 trainer: model.py (the model), train.py (the loop behind `mm1data train`), configs/."""
