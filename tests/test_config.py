import pytest

from loca.config import PRESETS, ConfigError, load_config


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_are_valid(name):
    cfg = load_config(name)
    assert cfg.views.reference_size % cfg.model.patch_size == 0


def test_official_defaults():
    cfg = load_config("vit_small_16")
    assert (cfg.model.width, cfg.model.depth, cfg.model.heads) == (384, 12, 6)
    assert cfg.reference_kept == 39 and cfg.random_query_kept == 70 and cfg.focal_query_grid == 6
    assert cfg.num_reference_positions == 196 and cfg.peak_lr == pytest.approx(1e-3)
    assert cfg.views.blur is False and cfg.model.num_prototypes == 4096
    demo = load_config("cpu_demo")
    assert demo.reference_grid == 8 and demo.random_query_kept == 23 and demo.reference_kept == 12
    assert load_config("vit_base_16").model.width == 768 and load_config("vit_huge_16").model.depth == 32


def test_overrides_and_yaml(tmp_path):
    cfg = load_config("cpu_demo", ["optim.lr=3e-4", "views.focal_query_scale=0.1,0.3", "seed=7",
                                   "run.max_steps=5", "loss.reference_mask=unstructured"])
    assert cfg.optim.lr == 3e-4 and cfg.views.focal_query_scale == (0.1, 0.3) and cfg.run.seed == 7
    path = tmp_path / "c.yaml"
    path.write_text("preset: cpu_tiny\nmodel:\n  depth: 3\n")
    cfg = load_config(str(path))
    assert cfg.model.depth == 3 and cfg.model.width == 64


@pytest.mark.parametrize("override, fragment", [
    (["model.depthh=3"], "unknown key model.depthh"),
    (["modle.depth=3"], "unknown section 'modle'"),
    (["views.reference_size=60"], "views.reference_size=60: must be a positive multiple of model.patch_size=8"),
    (["loss.reference_mask_ratio=1.5"], "loss.reference_mask_ratio=1.5: allowed [0, 1]"),
    (["views.random_query_keep=1.5"], "views.random_query_keep=1.5: allowed (0, 1]"),
    (["model.depth=two"], "model.depth: expected an integer, got 'two'"),
    (["optim.lr=fast"], "optim.lr: expected a number"),
    (["loss.reference_mask=blocky"], "loss.reference_mask='blocky'"),
    (["run.precision=fp8"], "run.precision='fp8'"),
    (["model.heads=5"], "model.width=192: must be divisible by model.heads=5"),
    (["depth"], "expected section.key=value"),
    (["views.mean=["], "is not valid YAML"),
    (["optim.grad_clip=0"], "optim.grad_clip=0.0: must be > 0"),
    (["run.device=gpu0"], "run.device='gpu0'"),
    (["views.contrast=1.5"], "views.contrast=1.5: allowed [0, 1)"),
    (["loss.weight_memax=-1"], "loss.weight_memax=-1.0: must be >= 0"),
    (["optim.betas=0.9,1.0"], "optim.betas=(0.9, 1.0): each allowed [0, 1)"),
])
def test_invalid_configs_name_the_key(override, fragment):
    with pytest.raises(ConfigError) as err:
        load_config("cpu_demo", override)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_unknown_key_in_yaml_and_missing_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  widht: 3\n")
    with pytest.raises(ConfigError, match="unknown key model.widht"):
        load_config(str(path))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match="neither a preset"):
        load_config("vit_gigantic")


def test_eta_one_keeps_no_reference_token():
    cfg = load_config("cpu_tiny", ["loss.reference_mask_ratio=1.0"])
    assert cfg.reference_kept == 0
