"""A training run on a small file system of its own, run by test_train's full-disk test inside a mount namespace:
the disk fills up just before the run's second checkpoint, then the run is resumed once there is room again.
Prints what happened as one line of JSON. Usage: full_disk.py DISK DATA"""

import hashlib
import json
import sys
from pathlib import Path

import torch

from residual import load_model, save_model
from residual.atomic import write_json
from residual.errors import NoSpaceError
from residual.train import TrainConfig, train
from residual.train import trainer as trainer_module
from residual.train.optim import OptimConfig

disk, data = Path(sys.argv[1]), sys.argv[2]
run = disk / "runs" / "full"
save_checkpoint = trainer_module.save_checkpoint
checkpoints = []
facts = {}


def fill_the_disk():
    with open(disk / "pad", "wb", buffering=0) as pad:
        try:
            while pad.write(bytes(1 << 16)):
                pass
        except OSError:  # ENOSPC: every byte there was is taken
            pass


def fill_before_the_second(state, path):
    checkpoints.append(path)
    if len(checkpoints) == 2:
        facts["previous_sha256"] = sha256(path)
        fill_the_disk()
    return save_checkpoint(state, path)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


trainer_module.save_checkpoint = fill_before_the_second
config = TrainConfig(data=data, out=str(run.parent), name=run.name, model="resnet20", epochs=2, batch_size=32,
                     optim=OptimConfig(lr=0.05), quiet=True, report=False)
try:
    train(config)
except NoSpaceError as error:
    facts["error"] = str(error)
facts["kept_epoch"] = torch.load(run / "last.pt", weights_only=True)["epoch"]
facts["kept_sha256"] = sha256(run / "last.pt")
facts["leftovers"] = sorted(path.name for path in run.iterdir() if path.name.endswith(".tmp"))
for name, write in [("safetensors", lambda path: save_model(load_model(run / "model.safetensors"), path)),
                    ("json", lambda path: write_json(path, {"epoch": 1}))]:
    try:
        write(disk / f"another.{name}")
    except NoSpaceError as error:
        facts[f"{name}_error"] = str(error)
(disk / "pad").unlink()
resumed = train(resume=run)
facts["resumed_epochs"] = len(resumed.history)
facts["final_epoch"] = torch.load(run / "last.pt", weights_only=True)["epoch"]
print(json.dumps(facts))
