"""Attention backends behind the one entry point: every exact backend this machine has equals
SDPA; an explicit backend this process cannot run is an error before loading; sliding-tile
attention with a window covering the grid equals dense attention, per engine and per request."""

from __future__ import annotations

import pytest
import torch

from vidloom import VideoGenerator
from vidloom.cli import main as cli_main
from vidloom.config import EngineConfig, SamplingParams
from vidloom.errors import InvalidRequestError
from vidloom.models.attention import (
    BACKENDS, SDPA, AttentionContext, attention, attention_context, available_backends, engine_backend,
    sdpa_attention, sliding_window,
)
from vidloom.models.sliding_tile import key_fraction, parse_window, sliding_tile_attention, tile_plan

from ..numerics import rel_err

# what each exact backend is held to against SDPA, per dtype (relative error on the whole output)
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def _inputs(dtype, device="cpu", lq=300, lk=300, heads=3, dim=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, n, heads, dim, generator=g) for n in (lq, lk, lk))
    return tuple(t.to(device, dtype) for t in (q, k, v))


def _devices_and_dtypes():
    cases = [("cpu", torch.float32), ("cpu", torch.bfloat16)]
    if torch.cuda.is_available():
        cases += [("cuda", torch.bfloat16), ("cuda", torch.float16)]
    return cases


@pytest.mark.parametrize("name", sorted(BACKENDS))
@pytest.mark.parametrize("device,dtype", _devices_and_dtypes(), ids=lambda x: str(x).removeprefix("torch."))
def test_every_exact_backend_present_equals_sdpa(name, device, dtype):
    backend = BACKENDS[name]
    if not backend.exact:
        pytest.skip(f"{name} is not exact (it approximates attention)")
    if name not in available_backends(torch.device(device), dtype):
        pytest.skip(f"{name} does not run {dtype} on {device} in this process")
    q, k, v = _inputs(dtype, device)
    bias = torch.zeros(300, device=device)
    bias[-1] = 2.0  # a collapsed padded prompt's log-count on the last key
    for kind, b in (("self", None), ("cross", bias)):
        with attention_context(AttentionContext(backend=backend)):
            out = attention(q, k, v, kind=kind, bias=b, layout=(3, 10, 10) if kind == "self" else None)
        ref = sdpa_attention(q.float(), k.float(), v.float(), bias=b)
        assert rel_err(out.float(), ref) <= TOLERANCE[dtype], (name, kind)


def test_auto_picks_an_exact_backend_present_and_sdpa_on_a_cpu():
    assert engine_backend("auto", torch.device("cpu"), torch.float32) is SDPA
    assert engine_backend("sliding_tile", torch.device("cpu"), torch.bfloat16) is SDPA
    assert engine_backend("flex", torch.device("cpu"), torch.float32) is BACKENDS["flex"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only errors")
@pytest.mark.parametrize("name,reason", [("flash", "needs a CUDA device"), ("sage", "needs a CUDA device")])
def test_a_cuda_backend_on_a_cpu_is_an_error_before_loading(tiny_wan_dir, monkeypatch, name, reason):
    import vidloom.generator as generator

    def no_loading(*args, **kwargs):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(generator, "load_components", no_loading)
    with pytest.raises(ValueError, match=f"attention_backend '{name}': {reason}"):
        VideoGenerator.from_pretrained(tiny_wan_dir, attention_backend=name)


def test_the_cli_reports_an_unavailable_backend_in_one_line(tiny_wan_dir, capsys):
    if torch.cuda.is_available():
        pytest.skip("flash may run here")
    code = cli_main(["generate", "--model", str(tiny_wan_dir), "--prompt", "a cat", "--attention-backend", "flash",
                     "--height", "48", "--width", "48", "--num-frames", "9", "--steps", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "attention_backend 'flash': needs a CUDA device" in err[0], err


def test_engine_options_name_the_allowed_values():
    with pytest.raises(ValueError, match=r"attention_backend: unknown 'xformers' \(allowed: sdpa, flex, flash, sage, "
                                         r"auto, sliding_tile\)"):
        EngineConfig(attention_backend="xformers")
    with pytest.raises(ValueError, match="'sliding_tile' needs sta_window"):
        EngineConfig(attention_backend="sliding_tile")
    with pytest.raises(ValueError, match="sta_window: expected three token counts"):
        EngineConfig(sta_window="3,6")
    assert parse_window("3, 6,6") == parse_window((3, 6, 6)) == (3, 6, 6)
    for bad in ("0,6,6", "a,b,c", (3, 6, True), 7, "3,6,6,1"):
        with pytest.raises(ValueError, match="sta_window"):
            parse_window(bad)
    with pytest.raises(InvalidRequestError, match=r"sta_window: got '3x6x6' \(allowed: 'F,H,W' token counts"):
        SamplingParams(sta_window="3x6x6").validate()
    assert SamplingParams(sta_window="1,2,3").validate().sta_window == (1, 2, 3)


# ---------------------------------------------------------------------------- sliding-tile attention

@pytest.mark.parametrize("layout", [(5, 6, 7), (9, 16, 16), (1, 3, 20)])
def test_a_window_covering_the_grid_is_dense_attention(layout):
    length = layout[0] * layout[1] * layout[2]
    q, k, v = _inputs(torch.float32, lq=length, lk=length, seed=1)
    dense = sdpa_attention(q, k, v)
    covering = sliding_tile_attention(q, k, v, layout=layout, window=layout, dense=sdpa_attention)
    assert rel_err(covering, dense) <= 1e-6  # fp32: the same keys in the same order, tile by tile
    bigger = sliding_tile_attention(q, k, v, layout=layout, window=(99, 99, 99), dense=sdpa_attention)
    assert rel_err(bigger, dense) <= 1e-6


def test_a_smaller_window_attends_to_fewer_keys_and_to_the_box_it_names():
    layout, window = (9, 16, 16), (3, 8, 8)
    length = 9 * 16 * 16
    q, k, v = _inputs(torch.float32, lq=length, lk=length, seed=2)
    out = sliding_tile_attention(q, k, v, layout=layout, window=window, dense=sdpa_attention)
    assert key_fraction(layout, window) < 0.2
    assert rel_err(out, sdpa_attention(q, k, v)) > 1e-2  # really restricted
    # every query tile: exactly attention over the key box the plan names (an independent gather)
    grid = lambda t: t.view(2, *layout, 3, 32)  # noqa: E731
    for (qf, qh, qw), (kf, kh, kw) in tile_plan(layout, window)[::7]:
        qs = grid(q)[:, slice(*qf), slice(*qh), slice(*qw)].reshape(2, -1, 3, 32)
        ks = grid(k)[:, slice(*kf), slice(*kh), slice(*kw)].reshape(2, -1, 3, 32)
        vs = grid(v)[:, slice(*kf), slice(*kh), slice(*kw)].reshape(2, -1, 3, 32)
        assert all(b - a == min(n, w) or b - a >= w for (a, b), n, w in zip((kf, kh, kw), layout, window))
        expect = sdpa_attention(qs, ks, vs)
        got = grid(out)[:, slice(*qf), slice(*qh), slice(*qw)].reshape(2, -1, 3, 32)
        assert rel_err(got, expect) <= 1e-6


def test_padding_queries_past_the_grid_get_zeros_and_the_rest_is_unchanged():
    layout = (3, 4, 5)
    q, k, v = _inputs(torch.float32, lq=64, lk=60, seed=3)  # 4 padding query rows, as under Ulysses
    out = sliding_tile_attention(q, k, v, layout=layout, window=(1, 2, 2), dense=sdpa_attention)
    alone = sliding_tile_attention(q[:, :60], k, v, layout=layout, window=(1, 2, 2), dense=sdpa_attention)
    assert torch.equal(out[:, :60], alone) and not out[:, 60:].any()


def test_the_window_applies_to_3d_self_attention_only():
    q, k, v = _inputs(torch.float32, lq=60, lk=60, seed=4)
    with sliding_window((1, 1, 1)):
        two_d = attention(q, k, v, kind="self", layout=(6, 10))  # the VAE's 2-D attention: dense
        cross = attention(q, k, v, kind="cross")
        three_d = attention(q, k, v, kind="self", layout=(3, 4, 5))
    dense = sdpa_attention(q, k, v)
    assert torch.equal(two_d, dense) and torch.equal(cross, dense)
    assert rel_err(three_d, dense) > 1e-2


REQUEST = dict(prompt="a red circle moving left", height=48, width=64, num_frames=9, num_inference_steps=2,
               guidance_scale=4.0, seed=5)  # a 3 x 3 x 4 token grid


@pytest.fixture(scope="module")
def dense_frames(tiny_wan_dir):
    return VideoGenerator.from_pretrained(tiny_wan_dir, dtype="fp32").generate(**REQUEST).frames


def test_sliding_tile_per_request_and_per_engine(tiny_wan_dir, dense_frames):
    gen = VideoGenerator.from_pretrained(tiny_wan_dir, dtype="fp32")
    covering = gen.generate(**REQUEST, sta_window="3,3,4").frames
    assert rel_err(covering, dense_frames) <= 1e-5  # fp32
    narrow = gen.generate(**REQUEST, sta_window=(1, 1, 1)).frames
    assert rel_err(narrow, dense_frames) > 1e-3  # the window really reached the transformer
    engine = VideoGenerator.from_pretrained(tiny_wan_dir, dtype="fp32", attention_backend="sliding_tile",
                                            sta_window="1,1,1")
    assert rel_err(engine.generate(**REQUEST).frames, narrow) <= 1e-6  # the engine's default window
    assert rel_err(engine.generate(**REQUEST, sta_window="dense").frames, dense_frames) <= 1e-6


def test_requests_with_other_windows_do_not_share_a_forward(tiny_wan_dir, dense_frames):
    gen = VideoGenerator.from_pretrained(tiny_wan_dir, dtype="fp32")
    tasks = [gen.submit(**REQUEST), gen.submit(**REQUEST, sta_window="1,1,1"), gen.submit(**REQUEST)]
    shared = []
    while not all(t.is_finished for t in tasks):
        shared += gen.step_many(tasks)
    assert shared and set(shared) == {2}  # the two dense requests together, the windowed one alone
    assert rel_err(tasks[0].result.frames, dense_frames) <= 1e-5
    assert rel_err(tasks[1].result.frames, dense_frames) > 1e-3


def test_the_flex_backend_generates_the_sdpa_video(tiny_wan_dir, dense_frames):
    gen = VideoGenerator.from_pretrained(tiny_wan_dir, dtype="fp32", attention_backend="flex")
    assert gen.attention.backend is BACKENDS["flex"]
    assert rel_err(gen.generate(**REQUEST).frames, dense_frames) <= 1e-5  # fp32
