"""params.yaml schema: every bad value fails with its dotted path, before any work."""
import copy

import pytest
import yaml

from conftest import ROOT
from pipeline.config import VARIANTS, Config, load_config, parse_config
from pipeline.config.apply import with_dotted
from pipeline.errors import PipelineError


def base() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_params_yaml_is_the_schema_default():
    cfg = load_config(ROOT / "params.yaml")
    assert cfg == Config(), "params.yaml and the schema defaults drifted apart"


def test_every_schema_field_is_in_params_yaml():
    """params.yaml is the single source of every knob: no field hides in code."""
    assert set(Config().flat()) == set(parse_config(base()).flat())
    written = base()
    for dotted in Config().flat():
        node = written
        for part in dotted.split("."):
            assert part in node, f"{dotted} is not spelled out in params.yaml"
            node = node[part]


def test_variants_are_timms():
    import timm

    assert set(VARIANTS) <= set(timm.list_models("iformer_*"))


@pytest.mark.parametrize(
    "path, value, needle",
    [
        ("model.variant", "iformer_x", "model.variant = 'iformer_x'"),
        ("optim.base_lr", 0, "optim.base_lr = 0"),
        ("optim.base_lr", -1e-3, "optim.base_lr = -0.001"),
        ("train.epochs", 0, "train.epochs = 0"),
        ("train.epochs", "ten", "train.epochs = 'ten'"),
        ("train.batch_size", -8, "train.batch_size = -8"),
        ("data.image_size", 100, "data.image_size = 100: must be a multiple of 32"),
        ("recipe", "imagenet_giant", "recipe = 'imagenet_giant': unknown recipe"),
        ("model.dropout", 0.1, "model.dropout = 0.1: unknown key"),
        ("ray.num_workers", 0, "ray.num_workers = 0"),
        # YAML gives real numbers and booleans: anything else is a typo, never coerced.
        ("train.epochs", True, "train.epochs = True: Input should be a valid integer"),
        ("train.epochs", "6", "train.epochs = '6'"),
        ("ray.use_gpu", "yes", "ray.use_gpu = 'yes': Input should be a valid boolean"),
        ("optim.base_lr", "1e-3", "optim.base_lr = '1e-3'"),
        ("aug.scale", ["0.5", 1.0], "aug.scale.0 = '0.5'"),
        ("ray.connect_timeout_s", 0, "ray.connect_timeout_s = 0"),
        ("export.processes", 0, "export.processes = 0"),
        ("export.processes", "all", "export.processes = 'all'"),
    ],
)
def test_bad_value_names_field_and_value(path, value, needle):
    with pytest.raises(PipelineError) as err:
        parse_config(with_dotted(base(), {path: value}))
    assert needle in str(err.value)
    assert str(err.value).count("\n") == 0, "one clear error, not a wall"


def test_batch_must_divide_over_workers():
    data = base()
    data["train"]["batch_size"] = 63
    data["ray"]["num_workers"] = 2
    with pytest.raises(PipelineError, match=r"train.batch_size \(63\) must be divisible by ray.num_workers \(2\)"):
        parse_config(data)


def test_imagefolder_needs_root():
    data = base()
    data["data"]["source"] = "imagefolder"
    with pytest.raises(PipelineError, match="data.root is required"):
        parse_config(data)


def test_linear_lr_scaling():
    data = base()
    data["optim"].update(base_lr=4e-3, base_batch_size=4096)
    data["train"]["batch_size"] = 1024
    assert parse_config(data).lr == pytest.approx(1e-3)


def test_params_hash_tracks_values():
    a = Config()
    b = Config.model_validate(copy.deepcopy(a.to_dict()) | {"train": {**a.to_dict()["train"], "epochs": 7}})
    assert a.params_hash() == Config().params_hash()
    assert a.params_hash() != b.params_hash()


def test_numbers_and_paths_from_yaml_still_parse():
    data = base()
    data["optim"]["base_lr"] = 1  # an int where a float is due is a number all the same
    data["train"]["resume_from"] = "ray_results/run/epoch-0001"
    cfg = parse_config(data)
    assert cfg.optim.base_lr == 1.0 and cfg.train.resume_from.name == "epoch-0001"
    assert cfg.aug.scale == (0.7, 1.0)


def test_an_empty_params_file_is_refused(tmp_path):
    empty = tmp_path / "params.yaml"
    empty.write_text("# nothing here\n")
    with pytest.raises(PipelineError, match="params.yaml: is empty; restore it with `git checkout -- params.yaml`"):
        load_config(empty)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(PipelineError, match="params file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(PipelineError, match="not valid YAML"):
        load_config(bad)
