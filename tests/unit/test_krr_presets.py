"""The FRePo, RFAD and KIP presets: one per method, data set and IPC; each loads and validates, names its method and
IPC, starts from real images, learns its labels, matches without augmentation, and cites a source for every number
(in one process, no Ray)."""

import re

import pytest
import yaml

from raydistill.config.loading import PRESETS
from raydistill.setup import load_config

METHODS = ("frepo", "rfad", "kip")
DATA_SETS = ("fashion-mnist", "cifar10", "cifar100")
IPCS = (1, 10, 50)

KRR_PRESETS = sorted(p.name[:-5] for p in PRESETS.iterdir() if re.match(r"(frepo|rfad|kip)-.*\.yaml$", p.name))


def test_there_is_a_preset_per_method_data_set_and_ipc():
    want = {f"{m}-{d}-ipc{k}" for m in METHODS for d in DATA_SETS for k in IPCS}
    assert want <= set(KRR_PRESETS)


@pytest.mark.parametrize("name", KRR_PRESETS)
def test_every_krr_preset_loads_validates_and_cites_its_numbers(name):
    cfg = load_config(name, check_paths=False)
    method, _, rest = name.partition("-")
    data_set = rest.rsplit("-ipc", 1)[0]
    assert cfg.method == method and cfg.ipc == int(rest.rsplit("ipc", 1)[1])
    assert cfg.data.name == data_set
    assert cfg.init.mode == "real" and cfg.labels.learn
    assert cfg.augment.strategies == []
    assert cfg.meta.optimizer == "adam" and cfg.meta.clip_factor == 0
    assert type(cfg.method_config).__name__.lower() == f"{method}config"
    text = (PRESETS / f"{name}.yaml").read_text()
    yaml.safe_load(text)
    assert text.startswith("# ")
    uncited = [line for line in text.splitlines() if re.search(r"\d", line.split("#")[0]) and "#" not in line]
    assert not uncited, f"{name}: numbers without a source comment: {uncited}"


@pytest.mark.parametrize("name", KRR_PRESETS)
def test_cifar_krr_presets_name_their_root_and_whiten(name):
    cfg = load_config(name, check_paths=False)
    text = (PRESETS / f"{name}.yaml").read_text()
    if cfg.data.name.startswith("cifar"):
        assert text.splitlines()[1].startswith("# Set data.root to a torchvision CIFAR-")
        assert cfg.data.zca and cfg.data.zca_reg == 0.1
    else:
        assert not cfg.data.zca
