"""LoRA adapters merged at load equal diffusers' ``load_lora_weights`` (+ ``set_adapters``) on the
whole video, fp32 <= 1e-4, for each format: diffusers/PEFT as ``save_lora_weights`` writes it
(its alpha from the file's metadata), LightX2V/ComfyUI (original Wan names, lora_A/B and
lora_down/up + alpha, diff_b) and kohya/musubi (underscored names, alpha); diffusers' own
converters read the non-diffusers files. A ``.diff`` full delta (which diffusers 0.42 drops) is
checked against diffusers with the delta added to its weight by hand."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from vidloom import VideoGenerator
from vidloom.lora import LoraError, detect_format, parse_lora_option, read_lora

from ..numerics import rel_err
from .test_generate_parity import FP32_RTOL, SIZE, diffusers_pipe, initial_latents, reference_frames

RANK, ALPHA = 4, 8
# (diffusers module suffix, original Wan name) of the layers the adapter touches in each block
LAYERS = [("attn1.to_q", "self_attn.q"), ("attn1.to_k", "self_attn.k"), ("attn1.to_v", "self_attn.v"),
          ("attn1.to_out.0", "self_attn.o"), ("attn2.to_q", "cross_attn.q"), ("attn2.to_k", "cross_attn.k"),
          ("attn2.to_v", "cross_attn.v"), ("attn2.to_out.0", "cross_attn.o"), ("ffn.net.0.proj", "ffn.0"),
          ("ffn.net.2", "ffn.2")]
PROMPT, NEGATIVE = "a red circle moving left", "blurry"


@pytest.fixture(scope="module")
def pairs(tiny_wan_pipe):
    """Random low-rank pairs (down (r, in), up (out, r)) for every LAYERS module of every block."""
    g = torch.Generator().manual_seed(7)
    out = {}
    for i, block in enumerate(tiny_wan_pipe.transformer.blocks):
        for name, _ in LAYERS:
            linear = block.get_submodule(name)
            out[f"blocks.{i}.{name}"] = (0.3 * torch.randn(RANK, linear.in_features, generator=g),
                                         0.3 * torch.randn(linear.out_features, RANK, generator=g))
    return out


def original_name(diffusers_name: str) -> str:
    block, _, rest = diffusers_name.partition(".")[2].partition(".")
    return f"blocks.{block}." + dict(LAYERS)[rest]


def write_diffusers(pairs, path):
    """As ``WanPipeline.save_lora_weights`` writes a PEFT adapter (r=4, lora_alpha=8 in the metadata)."""
    from diffusers import WanPipeline

    layers = {}
    for name, (down, up) in pairs.items():
        layers[f"{name}.lora_A.weight"], layers[f"{name}.lora_B.weight"] = down, up
    WanPipeline.save_lora_weights(str(path.parent), transformer_lora_layers=layers, weight_name=path.name,
                                  transformer_lora_adapter_metadata={"r": RANK, "lora_alpha": ALPHA,
                                                                     "target_modules": [n for n, _ in LAYERS]})
    return path


def write_lightx2v(pairs, path, names=("lora_A", "lora_B")):
    """diffusion_model.<original names>, an alpha and a bias delta (diff_b) per pair, as LightX2V's
    distilled LoRAs carry them."""
    tensors = {}
    g = torch.Generator().manual_seed(11)
    for name, (down, up) in pairs.items():
        key = "diffusion_model." + original_name(name)
        tensors[f"{key}.{names[0]}.weight"], tensors[f"{key}.{names[1]}.weight"] = down.contiguous(), up.contiguous()
        tensors[f"{key}.alpha"] = torch.tensor(float(ALPHA))
        tensors[f"{key}.diff_b"] = 0.05 * torch.randn(up.shape[0], generator=g)
    save_file(tensors, str(path))
    return path


def write_kohya(pairs, path):
    tensors = {}
    for name, (down, up) in pairs.items():
        key = "lora_unet_" + original_name(name).replace(".", "_")
        tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"] = down.contiguous(), up.contiguous()
        tensors[f"{key}.alpha"] = torch.tensor(float(ALPHA))
    save_file(tensors, str(path))
    return path


def reference(tiny_wan_dir, file, scale: float, extra=None):
    pipe = diffusers_pipe(tiny_wan_dir, torch.float32, "cpu")
    pipe.load_lora_weights(str(file), adapter_name="a")
    pipe.set_adapters(["a"], [scale])
    if extra is not None:
        extra(pipe)
    return reference_frames(pipe, PROMPT, NEGATIVE, 3, 4.0, initial_latents())


def ours(tiny_wan_dir, loras):
    gen = VideoGenerator.from_pretrained(tiny_wan_dir, dtype="fp32", loras=loras)
    return gen.generate(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=3, guidance_scale=4.0,
                        latents=initial_latents(), **SIZE).frames


@pytest.mark.parametrize("fmt,scale", [("diffusers", 1.0), ("diffusers", 0.6), ("lightx2v", 0.8),
                                       ("lightx2v-down-up", 1.0), ("kohya", 0.7)])
def test_merged_lora_equals_diffusers(tiny_wan_dir, pairs, tmp_path, fmt, scale):
    writers = {"diffusers": write_diffusers, "lightx2v": write_lightx2v, "kohya": write_kohya,
               "lightx2v-down-up": lambda p, f: write_lightx2v(p, f, names=("lora_down", "lora_up"))}
    file = writers[fmt](pairs, tmp_path / "adapter.safetensors")
    ref = reference(tiny_wan_dir, file, scale)
    plain = ours(tiny_wan_dir, [])
    got = ours(tiny_wan_dir, [(file, scale)])
    assert rel_err(got, ref) <= FP32_RTOL
    assert rel_err(plain, ref) > 1e-2  # the adapter really changes the video


def test_a_full_weight_diff_adds_scale_times_diff(tiny_wan_dir, pairs, tmp_path):
    """``.diff`` as ComfyUI and LightX2V apply it: W += scale * diff (the reference adds it by hand)."""
    file = write_lightx2v(pairs, tmp_path / "a.safetensors")
    from safetensors.torch import load_file

    tensors = load_file(str(file))
    diff = 0.05 * torch.randn(24, 24, generator=torch.Generator().manual_seed(1))  # dim 24: 2 heads x 12
    tensors["diffusion_model.blocks.1.cross_attn.o.diff"] = diff
    save_file(tensors, str(tmp_path / "b.safetensors"))
    scale = 0.5

    def add_diff(pipe):
        with torch.no_grad():
            pipe.transformer.blocks[1].attn2.to_out[0].base_layer.weight += scale * diff

    ref = reference(tiny_wan_dir, file, scale, add_diff)
    assert rel_err(ours(tiny_wan_dir, [(tmp_path / "b.safetensors", scale)]), ref) <= FP32_RTOL


def test_stacked_adapters_add(tiny_wan_dir, pairs, tmp_path):
    file = write_kohya(pairs, tmp_path / "k.safetensors")
    once = ours(tiny_wan_dir, [(file, 0.6)])
    twice = ours(tiny_wan_dir, [(file, 0.3), (file, 0.3)])
    assert rel_err(twice, once) <= 1e-5


def test_a_key_that_matches_nothing_is_an_error_unless_ignored(tiny_wan_dir, pairs, tmp_path):
    from vidloom.loader.weights import load_model
    from vidloom.models.wan_dit import WanDiT

    model = load_model(WanDiT, tiny_wan_dir / "transformer")
    good = write_kohya(pairs, tmp_path / "k.safetensors")
    assert detect_format(["lora_unet_x"]) == "kohya"
    deltas, report = read_lora(good, model)
    assert report.format == "kohya" and len(report.changed) == len(pairs) and not report.absent
    from safetensors.torch import load_file

    tensors = load_file(str(good))
    tensors["lora_unet_blocks_0_self_attn_qq.lora_down.weight"] = torch.zeros(4, 24)
    save_file(tensors, str(tmp_path / "bad.safetensors"))
    with pytest.raises(LoraError, match=r"key 'lora_unet_blocks_0_self_attn_qq.lora_down.weight' matches no module"):
        read_lora(tmp_path / "bad.safetensors", model)
    _, report = read_lora(tmp_path / "bad.safetensors", model, ignore=("lora_unet_blocks_0_self_attn_qq.lora_down.weight",))
    assert report.ignored == ["lora_unet_blocks_0_self_attn_qq.lora_down.weight"]
    # image keys on a text-to-video model: reported and skipped, not an error
    tensors = load_file(str(good))
    tensors["lora_unet_blocks_0_cross_attn_k_img.lora_down.weight"] = torch.zeros(4, 24)
    tensors["lora_unet_blocks_0_cross_attn_k_img.lora_up.weight"] = torch.zeros(24, 4)
    save_file(tensors, str(tmp_path / "img.safetensors"))
    _, report = read_lora(tmp_path / "img.safetensors", model)
    assert sorted(report.absent) == ["lora_unet_blocks_0_cross_attn_k_img.lora_down.weight",
                                     "lora_unet_blocks_0_cross_attn_k_img.lora_up.weight"]


def test_lora_options_and_errors(tiny_wan_dir, tmp_path):
    assert parse_lora_option("a.safetensors") == ("a.safetensors", 1.0)
    assert parse_lora_option("dir/a.safetensors:0.5") == ("dir/a.safetensors", 0.5)
    with pytest.raises(ValueError, match="loras_2: this folder has one transformer"):
        VideoGenerator.from_pretrained(tiny_wan_dir, loras_2=[(tmp_path / "x.safetensors", 1.0)])
    with pytest.raises(ValueError, match="loras: no LoRA file at"):
        VideoGenerator.from_pretrained(tiny_wan_dir, loras=[str(tmp_path / "missing.safetensors")])
    with pytest.raises(ValueError, match="loras: expected a list"):
        VideoGenerator.from_pretrained(tiny_wan_dir, loras="a.safetensors")


def test_the_cli_merges_a_lora_with_its_scale(tiny_wan_dir, pairs, tmp_path):
    import numpy as np

    from vidloom.cli import main as cli_main

    file = write_kohya(pairs, tmp_path / "k.safetensors")
    args = ["generate", "--model", str(tiny_wan_dir), "--prompt", PROMPT, "--height", "32", "--width", "48",
            "--num-frames", "9", "--steps", "2", "--seed", "4", "--dtype", "fp32", "--quiet"]
    assert cli_main(args + ["--lora", f"{file}:0.5", "--output", str(tmp_path / "a.npy")]) == 0
    gen = VideoGenerator.from_pretrained(tiny_wan_dir, dtype="fp32", loras=[(file, 0.5)])
    expected = gen.generate(PROMPT, height=32, width=48, num_frames=9, num_inference_steps=2, seed=4).frames
    assert rel_err(np.load(tmp_path / "a.npy"), expected) <= 1e-6


from .test_two_expert_parity import two_expert_dir  # noqa: E402,F401 - the fixture


def test_a_lora_per_expert_equals_diffusers_load_into_transformer_2(two_expert_dir, pairs, tmp_path):
    """``loras`` for the high-noise transformer, ``loras_2`` for the low-noise one, as diffusers'
    ``load_lora_weights(..., load_into_transformer_2=True)`` loads a second file."""
    from diffusers import WanPipeline

    high = write_kohya(pairs, tmp_path / "high.safetensors")
    flipped = {name: (down.flip(0), -up) for name, (down, up) in pairs.items()}  # another adapter
    low = write_diffusers(flipped, tmp_path / "low.safetensors")
    pipe = WanPipeline.from_pretrained(str(two_expert_dir), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(high), adapter_name="high")
    pipe.load_lora_weights(str(low), adapter_name="low", load_into_transformer_2=True)
    pipe.transformer.set_adapters(["high"], [0.7])
    pipe.transformer_2.set_adapters(["low"], [0.5])
    kwargs = dict(num_inference_steps=6, guidance_scale=4.0, **SIZE)
    ref = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, latents=initial_latents(5), output_type="np",
               **kwargs).frames[0]
    gen = VideoGenerator.from_pretrained(two_expert_dir, dtype="fp32", loras=[(high, 0.7)], loras_2=[(low, 0.5)])
    mine = gen.generate(PROMPT, negative_prompt=NEGATIVE, latents=initial_latents(5), **kwargs).frames
    plain = VideoGenerator.from_pretrained(two_expert_dir, dtype="fp32", loras=[(high, 0.7)]).generate(
        PROMPT, negative_prompt=NEGATIVE, latents=initial_latents(5), **kwargs).frames
    assert rel_err(mine, ref) <= FP32_RTOL
    assert rel_err(plain, ref) > 1e-3  # the second expert's adapter really counts


def test_an_image_to_video_lora_with_image_keys_equals_diffusers(tiny_wan_pipe, tmp_path):
    """A LightX2V I2V adapter: its cross-attention image projections (k_img, v_img) too."""
    from diffusers import WanImageToVideoPipeline

    from .test_i2v_parity import build_i2v_folder, picture

    folder = build_i2v_folder(tiny_wan_pipe, tmp_path / "i2v")
    ref_pipe = WanImageToVideoPipeline.from_pretrained(str(folder), dtype=torch.float32)
    ref_pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(9)
    pairs = {}
    for i, block in enumerate(ref_pipe.transformer.blocks):
        for name in [n for n, _ in LAYERS] + ["attn2.add_k_proj", "attn2.add_v_proj"]:
            linear = block.get_submodule(name)
            pairs[f"blocks.{i}.{name}"] = (0.3 * torch.randn(RANK, linear.in_features, generator=g),
                                           0.3 * torch.randn(linear.out_features, RANK, generator=g))
    LAYERS_I2V = dict(LAYERS, **{"attn2.add_k_proj": "cross_attn.k_img", "attn2.add_v_proj": "cross_attn.v_img"})
    tensors = {}
    for name, (down, up) in pairs.items():
        block, _, rest = name.partition(".")[2].partition(".")
        key = f"diffusion_model.blocks.{block}.{LAYERS_I2V[rest]}"
        tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = down.contiguous(), up.contiguous()
        tensors[f"{key}.alpha"] = torch.tensor(float(ALPHA))
    file = tmp_path / "i2v.safetensors"
    save_file(tensors, str(file))
    ref_pipe.load_lora_weights(str(file), adapter_name="a")
    ref_pipe.set_adapters(["a"], [0.9])
    kwargs = dict(num_inference_steps=3, guidance_scale=4.0, **SIZE)
    ref = ref_pipe(image=picture(1), prompt=PROMPT, negative_prompt=NEGATIVE, latents=initial_latents(8),
                   output_type="np", **kwargs).frames[0]
    gen = VideoGenerator.from_pretrained(folder, dtype="fp32", loras=[(file, 0.9)])
    mine = gen.generate(PROMPT, negative_prompt=NEGATIVE, image=picture(1), latents=initial_latents(8), **kwargs)
    assert rel_err(mine.frames, ref) <= FP32_RTOL


# ------------------------------------------------------------------------------ unmerged adapters

def test_an_unmerged_adapter_per_request_equals_diffusers_and_the_merged_one(tiny_wan_dir, pairs, tmp_path):
    file = write_lightx2v(pairs, tmp_path / "x.safetensors")
    ref = reference(tiny_wan_dir, file, 0.6)
    gen = VideoGenerator.from_pretrained(tiny_wan_dir, dtype="fp32")
    report = gen.load_lora(file, name="x")
    assert report.format == "lightx2v" and gen.adapters == {"x": report}
    run = dict(negative_prompt=NEGATIVE, num_inference_steps=3, guidance_scale=4.0, **SIZE)
    adapted = gen.generate(PROMPT, latents=initial_latents(), lora=[("x", 0.6)], **run).frames
    assert rel_err(adapted, ref) <= FP32_RTOL
    assert rel_err(adapted, ours(tiny_wan_dir, [(file, 0.6)])) <= 1e-5  # merged and unmerged agree
    # a request without the adapter is the plain model's video
    assert rel_err(gen.generate(PROMPT, latents=initial_latents(), **run).frames, ours(tiny_wan_dir, [])) <= 1e-6


def test_requests_with_different_adapters_share_one_forward(tiny_wan_dir, pairs, tmp_path):
    """Each row block gets its own low-rank update: every request's video is the one it gets alone."""
    gen = VideoGenerator.from_pretrained(tiny_wan_dir, dtype="fp32")
    gen.load_lora(write_kohya(pairs, tmp_path / "k.safetensors"), name="k")
    flipped = {name: (down.flip(0), -up) for name, (down, up) in pairs.items()}
    gen.load_lora(write_diffusers(flipped, tmp_path / "d.safetensors"), name="d")
    run = dict(negative_prompt=NEGATIVE, num_inference_steps=3, **SIZE)
    choices = [dict(lora=[("k", 0.7)], guidance_scale=4.0), dict(lora=None, guidance_scale=4.0),
               dict(lora=[("d", 1.0), ("k", 0.2)], guidance_scale=1.0), dict(lora=["d"], guidance_scale=3.0)]
    alone = [gen.generate(PROMPT, latents=initial_latents(), **run, **c).frames for c in choices]
    tasks = [gen.submit(PROMPT, latents=initial_latents(), **run, **c) for c in choices]
    shared = []
    while not all(t.is_finished for t in tasks):
        shared += gen.step_many(tasks)
    assert max(shared) >= 3  # the guided requests, whatever their adapters, in one forward
    for task, frames in zip(tasks, alone):
        assert rel_err(task.result.frames, frames) <= 1e-5
    assert rel_err(alone[0], alone[1]) > 1e-2 and rel_err(alone[0], alone[3]) > 1e-2


def test_unmerged_adapters_are_checked(tiny_wan_dir, pairs, tmp_path):
    from vidloom.errors import InvalidRequestError

    gen = VideoGenerator.from_pretrained(tiny_wan_dir, dtype="fp32")
    with pytest.raises(InvalidRequestError, match=r"lora: no adapter named 'x' is loaded \(allowed: none loaded"):
        gen.check("a cat", lora=[("x", 1.0)], **SIZE)
    with pytest.raises(InvalidRequestError, match="lora: got"):
        gen.check("a cat", lora="x", **SIZE)
    file = write_kohya(pairs, tmp_path / "k.safetensors")
    from safetensors.torch import load_file

    tensors = load_file(str(file))
    tensors["lora_unet_blocks_0.diff_m"] = torch.zeros(1, 6, 24)
    save_file(tensors, str(tmp_path / "m.safetensors"))
    with pytest.raises(ValueError, match="applies only merged"):
        gen.load_lora(tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match="expert 'transformer_2' is not a transformer of this model"):
        gen.load_lora(file, expert="transformer_2")
    low = VideoGenerator.from_pretrained(tiny_wan_dir, dtype="fp32", low_mem_level=2)
    with pytest.raises(ValueError, match="need the transformer resident"):
        low.load_lora(file)


def test_lora_mode_unmerged_applies_the_engines_adapters_to_requests_naming_none(tiny_wan_dir, pairs, tmp_path):
    from vidloom.cli import main as cli_main

    file = write_kohya(pairs, tmp_path / "k.safetensors")
    gen = VideoGenerator.from_pretrained(tiny_wan_dir, dtype="fp32", loras=[(file, 0.7)], lora_mode="unmerged")
    assert set(gen.adapters) == {"k"} and gen.default_lora == (("k", 0.7),)
    run = dict(negative_prompt=NEGATIVE, num_inference_steps=3, guidance_scale=4.0, latents=initial_latents(), **SIZE)
    assert rel_err(gen.generate(PROMPT, **run).frames, ours(tiny_wan_dir, [(file, 0.7)])) <= 1e-5
    assert rel_err(gen.generate(PROMPT, lora=[], **run).frames, ours(tiny_wan_dir, [])) <= 1e-6  # none asked
    args = ["generate", "--model", str(tiny_wan_dir), "--prompt", PROMPT, "--height", "32", "--width", "48",
            "--num-frames", "9", "--steps", "2", "--seed", "4", "--dtype", "fp32", "--quiet", "--lora", f"{file}:0.5"]
    assert cli_main(args + ["--output", str(tmp_path / "m.npy")]) == 0
    assert cli_main(args + ["--lora-mode", "unmerged", "--output", str(tmp_path / "u.npy")]) == 0
    import numpy as np

    assert rel_err(np.load(tmp_path / "u.npy"), np.load(tmp_path / "m.npy")) <= 1e-5
    with pytest.raises(ValueError, match="lora_mode: expected merged or unmerged"):
        VideoGenerator.from_pretrained(tiny_wan_dir, lora_mode="fused")


def test_bad_metadata_and_alphas_are_errors_naming_the_file(tiny_wan_dir, pairs, tmp_path):
    from vidloom.loader.weights import load_model
    from vidloom.models.wan_dit import WanDiT

    model = load_model(WanDiT, tiny_wan_dir / "transformer")
    down, up = pairs["blocks.0.attn1.to_q"]
    key = "transformer.blocks.0.attn1.to_q"
    tensors = {f"{key}.lora_A.weight": down.contiguous(), f"{key}.lora_B.weight": up.contiguous()}
    for bad in ('{"transformer.r": "4"}', '{"transformer.lora_alpha": -1}', '[1]', '{"rank_pattern": {"(a+)+$": 4}, "r": 0}'):
        save_file(tensors, str(tmp_path / "m.safetensors"), metadata={"lora_adapter_metadata": bad})
        with pytest.raises(LoraError, match="lora_adapter_metadata"):
            read_lora(tmp_path / "m.safetensors", model)
    kohya = {"lora_unet_blocks_0_self_attn_q.lora_down.weight": down.contiguous(),
             "lora_unet_blocks_0_self_attn_q.lora_up.weight": up.contiguous(),
             "lora_unet_blocks_0_self_attn_q.alpha": torch.tensor([float("nan")])}
    save_file(kohya, str(tmp_path / "a.safetensors"))
    with pytest.raises(LoraError, match=r"\.alpha' is not one finite number"):
        read_lora(tmp_path / "a.safetensors", model)
