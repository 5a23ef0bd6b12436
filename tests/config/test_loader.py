"""Named configs, base chains, overrides and the one-line errors of bad configs."""

import pytest

from maskrcnn.config import ConfigError, Precision, load_config, named_configs, to_text
from maskrcnn.config.loader import parse_text

ANCESTOR_TABLE = {  # name: (GPUs, images per GPU, epochs, LR decay epochs, clip)
    "8x1": (8, 1, 12, [8, 10], 0.0),
    "8x4": (8, 4, 12, [8, 10], 0.0),
    "16x4": (16, 4, 12, [8, 10], 0.0),
    "32x4": (32, 4, 12, [8, 10], 1.5),
    "8x4_24ep": (8, 4, 24, [16, 20], 0.0),
    "16x4_24ep": (16, 4, 24, [16, 20], 0.0),
    "32x4_24ep": (32, 4, 24, [16, 20], 1.5),
}


def test_all_named_configs_resolve():
    """If this fails, a shipped config does not load, or one of the ancestor's is missing."""
    assert set(ANCESTOR_TABLE) | {"shapes"} <= set(named_configs())
    for name in named_configs():
        load_config(name)


@pytest.mark.parametrize("name", sorted(ANCESTOR_TABLE))
def test_ancestor_configs_follow_the_recipe(name):
    """If this fails, an NxM config drifted from the ancestor's recipe (MISSION.md)."""
    gpus, per_gpu, epochs, decay, clip = ANCESTOR_TABLE[name]
    config = load_config(name)
    assert (config.run.num_gpus, config.run.images_per_gpu) == (gpus, per_gpu)
    assert config.solver.epochs == epochs and list(config.solver.lr_decay_epochs) == decay
    assert config.solver.grad_clip_norm == pytest.approx(clip)
    assert config.solver.base_lr_per_image == pytest.approx(0.00125)
    assert config.solver.warmup_steps == 1000
    assert config.model.backbone.depth == 50 and config.model.num_classes == 80
    assert list(config.model.anchors.sizes) == [32, 64, 128, 256, 512]
    assert list(config.model.roi_heads.bbox_reg_weights) == [10, 10, 5, 5]
    assert config.model.rpn.batch_size_per_image == 256
    assert config.model.roi_heads.batch_size_per_image == 512
    assert (config.data.short_side, config.data.max_long_side) == (800, 1333)
    assert config.run.precision == Precision.BF16


def test_shapes_is_a_cpu_config_on_synthetic_data():
    """If this fails, the default config no longer trains on the built-in data on the CPU."""
    config = load_config("shapes")
    assert config.data.use_synthetic and not config.data.train_json
    assert config.run.precision == Precision.FP32 and config.run.num_gpus == 1
    assert config.model.num_classes == 5


def test_override_replaces_scalars_and_repeated_fields():
    """If this fails, --set appends to lists instead of replacing them, or loses fields."""
    config = load_config("8x4", [
        "solver { base_lr_per_image: 0.0025 }",
        "data { canvas { height: 512 width: 512 } }",
        "solver { epochs: 6 lr_decay_epochs: [4] }",
    ])
    assert config.solver.base_lr_per_image == pytest.approx(0.0025)
    assert [(c.height, c.width) for c in config.data.canvas] == [(512, 512)]
    assert config.solver.epochs == 6 and list(config.solver.lr_decay_epochs) == [4]
    assert config.solver.momentum == pytest.approx(0.9)  # untouched fields stay


def test_resolved_config_is_explicit_and_round_trips():
    """If this fails, the written config hides defaults or cannot be read back."""
    config = load_config("shapes")
    text = to_text(config)
    assert "warmup_start_factor" in text and "pixel_mean" in text  # defaults made explicit
    assert parse_text(text, "roundtrip") == config


def test_config_file_path_and_relative_base(tmp_path):
    """If this fails, a user's own config file or its relative `base` is not followed."""
    (tmp_path / "parent.pbtxt").write_text('base: "8x4"\nsolver { epochs: 24 '
                                           'lr_decay_epochs: [16, 20] }\n')
    (tmp_path / "child.pbtxt").write_text('base: "parent.pbtxt"\nrun { seed: 7 }\n')
    config = load_config(str(tmp_path / "child.pbtxt"))
    assert config.solver.epochs == 24 and config.run.seed == 7 and config.run.num_gpus == 8


@pytest.mark.parametrize("override, message", [
    ("solver { bse_lr: 1 }", ':1:10: Message type "maskrcnn.SolverConfig" has no field named '
                             '"bse_lr"'),
    ('run { num_gpus: "two" }', "Couldn't parse integer"),
    ("run { precision: FP64 }", 'has no value named FP64'),
    ("data { flip_prob: 1.5 }", "data.flip_prob = 1.5: must be in [0, 1]"),
    ("model { backbone { depth: 42 } }", "model.backbone.depth = 42: must be 18, 34, 50 or 101"),
    ("data { canvas { height: 500 width: 512 } }", "data.canvas = 500x512"),
    ("model { anchors { sizes: [8, 16] } }", "must have one size per FPN level (5 strides)"),
    ("solver {", 'Expected "}"'),
    ("model { backbone { norm: GROUP_NORM weights_path: 'r50.pth' } }",
     "model.backbone.norm = GROUP_NORM: must be FROZEN_BN with weights_path"),
    ("model { backbone { norm: BATCH_NORM frozen_stages: 1 } }",
     "model.backbone.norm = BATCH_NORM: must not be BATCH_NORM with frozen_stages > 0"),
    ("run { checkpoint_period_steps: -1 }", "run.checkpoint_period_steps = -1: must be >= 0"),
    ("run { precision: FP16 }", "run.cuda_graph = True: needs precision FP32 or BF16"),
    ("model { roi_heads { head_group_norm: true mask_head_channels: 48 } }",
     "model.roi_heads.mask_head_channels = 48: must be divisible by 32 with head_group_norm"),
])
def test_bad_override_names_override_and_field(override, message):
    """If this fails, a bad --set gives a vague or multi-line error."""
    with pytest.raises(ConfigError) as caught:
        load_config("8x4", [override])
    text = str(caught.value)
    assert text.startswith("--set #1") and message in text and "\n" not in text


def test_cross_field_error_blames_the_layer_that_changed(tmp_path):
    """If this fails, an error about epochs set by an override blames the shipped file."""
    with pytest.raises(ConfigError, match=r"^--set #1 .*solver.lr_decay_epochs = \[8, 10\]"):
        load_config("8x4", ["solver { epochs: 6 }"])


def test_bad_file_names_the_file_and_line(tmp_path):
    """If this fails, a typo in a config file does not say which file and line."""
    path = tmp_path / "mine.pbtxt"
    path.write_text('base: "shapes"\nsolver {\n  learning_rate: 0.1\n}\n')
    with pytest.raises(ConfigError, match=rf"^{path}:3:\d+: .*learning_rate"):
        load_config(str(path))
    path.write_text('base: "shapes"\nrun { images_per_gpu: 0 }\n')
    with pytest.raises(ConfigError, match=rf"^{path}: run.images_per_gpu = 0: must be > 0"):
        load_config(str(path))


def test_unknown_names_and_loops(tmp_path):
    """If this fails, a misspelt --config or a looping base chain is not reported clearly."""
    with pytest.raises(ConfigError, match="unknown config '8x5'.*32x4"):
        load_config("8x5")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.pbtxt"))
    loop = tmp_path / "loop.pbtxt"
    loop.write_text('base: "loop.pbtxt"\n')
    with pytest.raises(ConfigError, match="loops back"):
        load_config(str(loop))


def test_random_backbone_weights_fit_every_norm():
    """If this fails, `--backbone_weights=random` (asking for no weights file) is refused for a
    group-norm or trained batch-norm config with the message meant for a weights file."""
    for norm in ("GROUP_NORM", "BATCH_NORM", "FROZEN_BN"):
        config = load_config("shapes", [f"model {{ backbone {{ norm: {norm} weights_path: "
                                        "'random' } }"])
        assert config.model.backbone.weights_path == "random"
