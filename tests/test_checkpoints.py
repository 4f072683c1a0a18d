"""Checkpoints rebuild their model alone, refuse wrong shapes / versions / pickled code."""
import os

import pytest
import torch

from natra_ray.checkpoints import FORMAT_VERSION, CheckpointError, load_module, read_checkpoint, save_checkpoint
from natra_ray.models import create_generator, create_model


def factory(name, **kw):
    return create_model("generator", name, **kw)


def test_round_trip_rebuilds_from_file_alone(tmp_path):
    g = create_generator("style_tiny")
    kw = {"resolution": 32, "img_channels": 1}
    path = save_checkpoint(tmp_path / "g.pt", g, kind="generator", name="style_tiny", kwargs=kw,
                           config={"gan": {"steps": 3}}, extra={"note": (1, 2)})
    g2, ckpt = load_module(path, kind="generator", factory=factory)
    z = g.sample_z(2)
    assert torch.equal(g(z), g2(z))
    assert ckpt["config"]["gan"]["steps"] == 3 and ckpt["format_version"] == FORMAT_VERSION
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())  # atomic write left nothing


def test_wrong_shape_names_the_tensor(tmp_path):
    small = create_generator("style", resolution=32, z_dim=16, w_dim=16, channels=16, mapping_layers=2)
    path = save_checkpoint(tmp_path / "g.pt", small, kind="generator", name="style",
                           kwargs={"resolution": 32, "z_dim": 16, "w_dim": 16, "channels": 16, "mapping_layers": 2})
    ckpt = read_checkpoint(path)
    ckpt["kwargs"]["channels"] = 32  # a file whose weights disagree with its declared size
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match=r"tensor '.*' has shape \(.*\) but the model expects"):
        load_module(path, kind="generator", factory=factory)


def test_asking_for_another_architecture_is_refused(tmp_path):
    g = create_generator("style_tiny")
    path = save_checkpoint(tmp_path / "g.pt", g, kind="generator", name="style_tiny", kwargs={"resolution": 32})
    with pytest.raises(CheckpointError, match="saved with resolution=32 but resolution=64 was asked for"):
        load_module(path, kind="generator", factory=factory, resolution=64)
    with pytest.raises(CheckpointError, match="holds a 'generator', not a 'classifier'"):
        load_module(path, kind="classifier", factory=factory)


def test_future_format_version_is_refused(tmp_path):
    g = create_generator("style_tiny")
    path = save_checkpoint(tmp_path / "g.pt", g, kind="generator", name="style_tiny", kwargs={})
    ckpt = read_checkpoint(path)
    ckpt["format_version"] = FORMAT_VERSION + 1
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match="format version 2.*Upgrade natra_ray"):
        read_checkpoint(path)


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/natra_pwned_marker",))


def test_pickled_code_is_refused_and_not_run(tmp_path):
    marker = "/tmp/natra_pwned_marker"
    if os.path.exists(marker):
        os.unlink(marker)
    path = tmp_path / "evil.pt"
    torch.save({"format_version": 1, "state_dict": {}, "payload": _Evil()}, path)
    with pytest.raises(CheckpointError, match="refusing to load"):
        read_checkpoint(path)
    assert not os.path.exists(marker)


def test_truncated_and_missing_files(tmp_path):
    g = create_generator("style_tiny")
    path = save_checkpoint(tmp_path / "g.pt", g, kind="generator", name="style_tiny", kwargs={})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint"):
        read_checkpoint(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        read_checkpoint(tmp_path / "nope.pt")
