"""The CLI end to end on a tiny model; the MP4 read back with a real decoder (PyAV)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from vidloom import RefineParams, VideoGenerator
from vidloom.cli import main

ARGS = ["--height", "32", "--width", "48", "--num-frames", "9", "--steps", "3", "--dtype", "fp32", "--quiet"]


def run_cli(*argv):
    return subprocess.run([sys.executable, "-m", "vidloom", *argv], capture_output=True, text=True, timeout=300)


def test_generate_mp4_read_back_with_pyav(tiny_wan_dir, tmp_path):
    av = pytest.importorskip("av")
    out = tmp_path / "clip.mp4"
    proc = run_cli("generate", "--model", str(tiny_wan_dir), "--prompt", "a red circle", "--output", str(out),
                   "--fps", "12", *ARGS)
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith(f"wrote {out}") and "denoising" in last and "decoding" in last
    with av.open(str(out)) as container:
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        assert stream.codec_context.name == "h264"
        assert stream.codec_context.pix_fmt == "yuv420p"
        assert stream.average_rate == 12
    assert len(frames) == 9 and frames[0].shape == (32, 48, 3)


def test_npy_output_equals_python_api(tiny_wan_dir, tmp_path, capsys):
    out = tmp_path / "frames.npy"
    assert main(["generate", "--model", str(tiny_wan_dir), "--prompt", "a cat", "--output", str(out),
                 "--seed", "3", *ARGS]) == 0
    frames = np.load(out)
    ref = VideoGenerator.from_pretrained(tiny_wan_dir, dtype="fp32").generate(
        "a cat", seed=3, height=32, width=48, num_frames=9, num_inference_steps=3).frames
    assert frames.dtype == np.float32 and np.array_equal(frames, ref)


def test_refine_flags_equal_python_api(tiny_wan_dir, tmp_path):
    out = tmp_path / "frames.npy"
    argv = ["--height", "64", "--width", "96", "--num-frames", "9", "--steps", "3", "--dtype", "fp32", "--quiet"]
    assert main(["generate", "--model", str(tiny_wan_dir), "--prompt", "a cat", "--output", str(out), "--seed", "3",
                 "--refine-scale", "2", "--refine-strength", "0.5", "--refine-steps", "2", *argv]) == 0
    ref = VideoGenerator.from_pretrained(tiny_wan_dir, dtype="fp32").generate(
        "a cat", seed=3, height=64, width=96, num_frames=9, num_inference_steps=3,
        refine=RefineParams(scale=2, strength=0.5, steps=2)).frames
    assert np.array_equal(np.load(out), ref)


def test_bad_refine_flag_is_one_line_error(tiny_wan_dir, tmp_path, capsys):
    assert main(["generate", "--model", str(tiny_wan_dir), "--prompt", "a cat", "--output", str(tmp_path / "o.npy"),
                 "--refine-strength", "0", *ARGS]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: refine.strength: got 0.0 (allowed: numbers in (0, 1])"]


def test_png_folder_and_gif(tiny_wan_dir, tmp_path):
    assert main(["generate", "--model", str(tiny_wan_dir), "--prompt", "a cat", "--output",
                 str(tmp_path / "pngs"), *ARGS]) == 0
    assert len(list((tmp_path / "pngs").glob("frame_*.png"))) == 9
    assert main(["generate", "--model", str(tiny_wan_dir), "--prompt", "a cat", "--output",
                 str(tmp_path / "a.gif"), *ARGS]) == 0
    assert (tmp_path / "a.gif").stat().st_size > 0


@pytest.mark.parametrize("argv,needle", [
    (["--height", "33"], "height"),
    (["--num-frames", "8"], "num_frames"),
    (["--steps", "0"], "num_inference_steps"),
    (["--guidance-scale", "-2"], "guidance_scale"),
    (["--dit-dtype", "bf16", "--output", "x.webm"], "output_path"),
])
def test_bad_arguments_give_one_line_error(tiny_wan_dir, argv, needle, tmp_path):
    proc = run_cli("generate", "--model", str(tiny_wan_dir), "--prompt", "a cat",
                   "--output", str(tmp_path / "o.mp4"), *ARGS, *argv)
    assert proc.returncode == 2
    lines = [l for l in proc.stderr.strip().splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and needle in lines[0]


def test_missing_model_folder(tmp_path):
    proc = run_cli("generate", "--model", str(tmp_path), "--prompt", "a cat")
    assert proc.returncode == 2 and "model_index.json" in proc.stderr


def test_info(tiny_wan_dir, capsys):
    assert main(["info", "--model", str(tiny_wan_dir)]) == 0
    out = capsys.readouterr().out
    assert "pipeline: WanPipeline" in out and "variant: Wan2.1 text-to-video" in out


def test_info_escapes_control_characters(tiny_wan_dir, tmp_path, capsys):
    import json
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(tiny_wan_dir, folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["_class_name"] = "WanPipeline\x1b[2J\x1b]0;pwned\x07"
    index["note"] = "x\x1b[31m"
    (folder / "model_index.json").write_text(json.dumps(index))
    assert main(["info", "--model", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out
    assert "WanPipeline\\x1b[2J\\x1b]0;pwned\\x07" in out


def test_nproc_layout_is_checked_before_any_process_starts(tiny_wan_dir, monkeypatch, capsys):
    import vidloom.cli as cli

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(cli, "launch", lambda *a: pytest.fail("processes were started"))
    assert main(["generate", "--model", str(tiny_wan_dir), "--prompt", "a cat", "--nproc", "3", "--sp-size", "2",
                 *ARGS]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "needs 2 processes, but the world size is 3" in errors[0]
    assert main(["generate", "--model", str(tiny_wan_dir), "--prompt", "a cat", "--nproc", "100000", *ARGS]) == 2
    assert "--nproc: expected an integer in 1..64" in capsys.readouterr().err


@pytest.mark.parametrize("index", ["5", "[" * 100_000])
def test_malformed_folder_is_one_line_error_in_every_command(tmp_path, index, capsys):
    (tmp_path / "model_index.json").write_text(index)
    for argv in (["info", "--model", str(tmp_path)], ["generate", "--model", str(tmp_path), "--prompt", "x"]):
        assert main(argv) == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "model_index.json" in errors[0]


def test_prompts_file_writes_one_file_per_prompt(tiny_wan_dir, tiny_generator, tmp_path, capsys):
    from .numerics import rel_err

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\n  a blue square  \r\n\na cat\n")  # blank lines skipped, blanks stripped
    out = tmp_path / "clip.npy"
    assert main(["generate", "--model", str(tiny_wan_dir), "--prompts-file", str(prompts), "--output", str(out),
                 "--seed", "3", *ARGS]) == 0
    wrote = [line for line in capsys.readouterr().out.splitlines() if line.startswith("wrote ")]
    assert [line.split()[1] for line in wrote] == [str(tmp_path / f"clip-{k}.npy") for k in range(3)]
    for k, prompt in enumerate(["a red circle", "a blue square", "a cat"]):
        ref = tiny_generator.generate(prompt, seed=3, height=32, width=48, num_frames=9, num_inference_steps=3)
        assert rel_err(np.load(tmp_path / f"clip-{k}.npy"), ref.frames) <= 1e-4


def test_num_videos_per_prompt_flag(tiny_wan_dir, tiny_generator, tmp_path):
    from .numerics import rel_err

    out = tmp_path / "clip.npy"
    assert main(["generate", "--model", str(tiny_wan_dir), "--prompt", "a cat", "--num-videos-per-prompt", "2",
                 "--output", str(out), "--seed", "5", *ARGS]) == 0
    a, b = np.load(tmp_path / "clip-0.npy"), np.load(tmp_path / "clip-1.npy")
    assert not np.allclose(a, b) and not out.exists()
    ref = tiny_generator.generate("a cat", seed=6, height=32, width=48, num_frames=9, num_inference_steps=3).frames
    assert rel_err(b, ref) <= 1e-4  # the second video has seed 5 + 1


@pytest.mark.parametrize("content,needle", [
    (None, "--prompts-file: no such file"),
    ("\n  \n\n", "--prompts-file: " + "{path} holds no prompt"),
    ("".join(f"prompt {i}\n" for i in range(65)), "--prompts-file: more than 64 prompts (line 65)"),
    ("a cat\na\0dog\n", "--prompts-file line 2: contains a NUL character"),
    (b"a cat\n\xff\xfe\n", "--prompts-file: {path} is not UTF-8 text"),
])
def test_bad_prompts_file_is_one_line_error(tiny_wan_dir, tmp_path, capsys, content, needle):
    path = tmp_path / "prompts.txt"
    if isinstance(content, str):
        path.write_text(content)
    elif content is not None:
        path.write_bytes(content)
    assert main(["generate", "--model", str(tiny_wan_dir), "--prompts-file", str(path), "--output",
                 str(tmp_path / "o.npy"), *ARGS]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: " + needle.format(path=path)), err
    assert list(tmp_path.iterdir()) == ([path] if content is not None else [])


@pytest.mark.parametrize("argv,needle", [
    (["--prompt", "a cat", "--num-videos-per-prompt", "0"], "error: num_videos_per_prompt: got 0"),
    (["--prompt", "a cat", "--num-videos-per-prompt", "65"], "error: num_videos_per_prompt: 1 prompt(s) x 65"),
])
def test_bad_num_videos_per_prompt_is_one_line_error(tiny_wan_dir, tmp_path, capsys, argv, needle):
    assert main(["generate", "--model", str(tiny_wan_dir), *argv, "--output", str(tmp_path / "o.npy"), *ARGS]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(needle), err
