"""The memory budget: the engine's level is the lowest whose estimated peak fits max_memory (or,
without one, the memory available); a budget no level fits is an error before any loading; a
request too large for every level is refused at check, naming its size; a request that needs a
higher level than the engine's runs at it. `vidloom info` prints the estimates."""

from __future__ import annotations

import logging

import pytest

import vidloom.memory.budget as budget_mod
from vidloom import EngineConfig, VideoGenerator
from vidloom.cli import main as cli_main
from vidloom.errors import InvalidRequestError
from vidloom.loader.plan import plan_folder
from vidloom.memory.budget import level_peaks
from vidloom.memory.estimate import parse_bytes

SMALL = dict(num_frames=9, height=32, width=48)


@pytest.fixture(scope="module")
def peaks(tiny_wan_dir):
    """The tiny folder's estimated peaks for its nominal request (the engine defaults, 81x480x832)."""
    plan = plan_folder(tiny_wan_dir, EngineConfig(dtype="fp32"))
    return level_peaks(plan.plans, EngineConfig(dtype="fp32"), 81, 480, 832)


@pytest.mark.parametrize("text, expected", [("8GiB", 8 * 2**30), ("512MiB", 512 * 2**20), ("16GB", 16 * 10**9),
                                            ("1.5 GiB", int(1.5 * 2**30)), (4096, 4096), ("100", 100)])
def test_sizes_are_read(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("bad", ["lots", "-1GiB", "0", 0, True, "8 GiBs", 1.5])
def test_a_bad_size_names_max_memory(bad):
    with pytest.raises(ValueError, match="max_memory"):
        EngineConfig(max_memory=bad)


def test_a_budget_picks_the_lowest_level_that_fits(tiny_wan_dir, peaks, caplog):
    assert peaks[2] < peaks[0]  # level 2 holds one component at a time
    between = (peaks[2] + min(peaks[0], peaks[1])) // 2 if peaks[1] > peaks[2] else (peaks[2] + peaks[0]) // 2
    with caplog.at_level(logging.WARNING):
        gen = VideoGenerator.from_pretrained(tiny_wan_dir, dtype="fp32", max_memory=between)
    assert gen.config.low_mem_level == 2 and "low_mem_level 2 chosen" in caplog.text
    roomy = VideoGenerator.from_pretrained(tiny_wan_dir, dtype="fp32", max_memory="64GiB")
    assert roomy.config.low_mem_level == 0


def test_a_budget_no_level_fits_is_an_error_before_loading(tiny_wan_dir, peaks, monkeypatch):
    import vidloom.generator as generator

    monkeypatch.setattr(generator, "load_components", lambda *a, **k: pytest.fail("weights were loaded"))
    with pytest.raises(ValueError, match=r"max_memory: 1000 fits no memory level: even the smallest request needs an "
                                         r"estimated [0-9.]+ GiB at level 3"):
        VideoGenerator.from_pretrained(tiny_wan_dir, dtype="fp32", max_memory=1000)


def test_requests_are_held_to_the_budget(tiny_wan_dir, peaks):
    gen = VideoGenerator.from_pretrained(tiny_wan_dir, dtype="fp32", max_memory=peaks[0] + 2**20)
    assert gen.config.low_mem_level == 0
    task = gen.submit("a cat", num_inference_steps=2, **SMALL)
    assert task.memory_level == 0
    big = dict(num_frames=241, height=1024, width=1024)  # within the model's limits, not the budget's
    with pytest.raises(InvalidRequestError, match=r"num_frames: a 241x1024x1024 video needs an estimated .* above the "
                                                  r"max_memory") as info:
        gen.check("a cat", **big)
    assert info.value.field == "num_frames"
    # a request that fits only from a higher level runs there (the engine stays at 0)
    sizes = [(f, h, w) for f in range(81, 122, 4) for h, w in ((480, 832), (480, 896), (512, 896), (544, 960))]
    fitting = [(f, h, w) for f, h, w in sizes if (lambda p: p[1] <= gen.budget.limit < p[0])(
        level_peaks(gen.budget.plans, gen.config, f, h, w, loaded_level=0))]
    assert fitting, "no size between the levels' peaks"
    medium = dict(zip(("num_frames", "height", "width"), fitting[0]))
    assert gen.submit("a cat", **medium).memory_level == 1


def test_without_a_level_or_budget_the_engine_fits_the_machine(tiny_wan_dir, peaks, monkeypatch, caplog):
    limit = min(peaks.values()) + 2**20
    expected = next(level for level in (0, 1, 2) if peaks[level] <= limit)
    assert expected > 0
    monkeypatch.setattr(budget_mod, "machine_memory", lambda device: int(limit / budget_mod.AVAILABLE_SHARE) + 1)
    with caplog.at_level(logging.WARNING):
        gen = VideoGenerator.from_pretrained(tiny_wan_dir, dtype="fp32")
    assert gen.config.low_mem_level == expected and "available" in caplog.text
    assert VideoGenerator.from_pretrained(tiny_wan_dir, dtype="fp32", low_mem_level=0).config.low_mem_level == 0


def test_info_prints_component_sizes_and_peaks(tiny_wan_dir, capsys):
    assert cli_main(["info", "--model", str(tiny_wan_dir), "--height", "32", "--width", "48",
                     "--num-frames", "9"]) == 0
    out = capsys.readouterr().out
    assert "memory (a 9x32x48 request" in out
    dtypes = EngineConfig().resolved_dtypes()  # bf16 where this CPU computes it natively
    for name in ("text_encoder", "transformer", "vae"):
        as_dtype = "GiB as " + str(dtypes[name]).removeprefix("torch.")
        assert any(line.strip().startswith(name) and as_dtype in line for line in out.splitlines()), out
    assert [line.split(":")[0].strip() for line in out.splitlines() if "estimated peak" in line] == \
        [f"low_mem_level {level}" for level in (0, 1, 2, 3)]


def test_a_budget_the_default_size_does_not_fit_runs_at_the_highest_level(tiny_wan_dir, peaks, caplog):
    """A budget smaller than the default (81x480x832) request needs at every level, but enough for
    small requests: the engine loads at the highest level and holds each request to the budget."""
    small = level_peaks(plan_folder(tiny_wan_dir, EngineConfig(dtype="fp32")).plans, EngineConfig(dtype="fp32"),
                        **SMALL)
    limit = (small[3] + peaks[3]) // 2
    assert small[3] < limit < peaks[3]
    with caplog.at_level(logging.WARNING):
        gen = VideoGenerator.from_pretrained(tiny_wan_dir, dtype="fp32", max_memory=limit)
    assert gen.config.low_mem_level == 3 and "requests held to the budget" in caplog.text
    assert gen.generate("a cat", num_inference_steps=2, **SMALL).frames.shape == (9, 32, 48, 3)
    with pytest.raises(InvalidRequestError, match="num_frames"):
        gen.check("a cat")  # the default size: no level fits it


def test_a_size_hint_no_level_fits_is_an_error_before_loading(tiny_wan_dir, peaks, monkeypatch, capsys):
    """What the CLI does: the request's size is known, so a budget it cannot fit fails before any
    weight is read."""
    import vidloom.generator as generator

    monkeypatch.setattr(generator, "load_components", lambda *a, **k: pytest.fail("weights were loaded"))
    with pytest.raises(ValueError, match=r"max_memory: .* fits no memory level for a 81x480x832 request"):
        VideoGenerator.from_pretrained(tiny_wan_dir, dtype="fp32", max_memory=peaks[3] - 2**20,
                                       size_hint=dict(num_frames=81, height=480, width=832))
    assert cli_main(["generate", "--model", str(tiny_wan_dir), "--prompt", "a cat", "--height", "480", "--width",
                     "832", "--num-frames", "81", "--max-memory", str(peaks[3] - 2**20)]) == 2
    assert "fits no memory level for a 81x480x832 request" in capsys.readouterr().err
