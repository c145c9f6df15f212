"""`tinyi2v bench`: its table, its FLOP counts and its per-stage memory peaks."""
from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from tinyi2v import bench, denoiser
from tinyi2v.cli import cli
from tinyi2v.vae import layers

from conftest import make_tiny_model


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("model"))


def test_bench_prints_every_stage_and_writes_the_animate_clip(model, tmp_path):
    photo = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 96, 3), np.uint8)).save(photo)
    runner = CliRunner()
    result = runner.invoke(cli, ["bench", str(photo), "--model", str(model), "--steps", "2",
                                 "-o", str(tmp_path / "bench.gif")])
    assert result.exit_code == 0, result.output
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in result.output.splitlines()
            if line.startswith("| ") and not line.startswith("| stage")}
    assert list(rows) == ["load", "warm-up", "encode", "denoise step 1/2", "denoise step 2/2",
                          "decode", "write", "total (encode to write)"]
    cfg = denoiser.load_denoiser(model).config
    gflop = denoiser.flops(cfg, (1, 8, 2, 2, 3)) / 1e9           # 64x96x9 -> latent [8, 2, 2, 3]
    assert float(rows["denoise step 2/2"][1]) == pytest.approx(gflop, abs=0.05)
    assert float(rows["decode"][1]) >= 0 and rows["load"][1].strip() == "-"
    # the same clip as animate with the same seed and schedule
    result = runner.invoke(cli, ["animate", str(photo), "--model", str(model), "--steps", "2",
                                 "-o", str(tmp_path / "animate.gif")])
    assert result.exit_code == 0, result.output
    frames = [np.stack([np.asarray(f.convert("RGB")) for f in _frames(tmp_path / name)])
              for name in ("bench.gif", "animate.gif")]
    np.testing.assert_array_equal(*frames)


def _frames(path):
    from PIL import ImageSequence

    with Image.open(path) as im:
        return [f.copy() for f in ImageSequence.Iterator(im)]


def test_denoiser_flops_match_the_specification():
    """Spec §10: 1437.4 useful GFLOP at 2760 tokens; the count leaves out the ~0.3 GFLOP of
    adaLN tables and normalisations."""
    gflop = denoiser.flops(denoiser.official_config(), (1, 128, 3, 23, 40)) / 1e9
    assert gflop == pytest.approx(1437.4, rel=5e-4)
    assert denoiser.flops(denoiser.official_config(), (2, 128, 3, 23, 40)) == 2e9 * gflop


def test_conv_flops_count_what_the_convolutions_compute():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 5, 6, 4)).astype(np.float32)
    before = layers.ConvFlops.total
    out = layers.conv3d(x, rng.standard_normal((7, 4, 3, 3, 3)).astype(np.float32),
                        temporal_pad=(2, 0))
    assert out.shape == (3, 5, 6, 7)
    assert layers.ConvFlops.total - before == 2 * out.size * 4 * 27
    before = layers.ConvFlops.total
    out = layers.depthwise_conv3d(x, rng.standard_normal((4, 1, 3, 3, 3)).astype(np.float32),
                                  None, temporal_pad=(1, 1))
    assert layers.ConvFlops.total - before == 2 * out.size * 27


def test_peak_memory_is_per_stage():
    if not bench.reset_peak():
        pytest.skip("no /proc/self/clear_refs here")
    big = np.ones(64 * 2**20 // 4, np.float32)                  # 64 MiB, touched
    high = bench.peak_rss_mb()
    del big
    bench.reset_peak()
    assert bench.peak_rss_mb() < high - 32
