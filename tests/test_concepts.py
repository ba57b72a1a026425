"""Concept maps (ConceptAttention) on every MM-DiT: the image untouched, shares that sum to 1, the method's formula
re-stated from the stock modules (SD3), each family's concept stream against its stock blocks, the outputs of
`p2p attend --concepts`, and bad input."""

import dataclasses
import json

import pytest
import torch
from safetensors import safe_open

from prompt2prompt.attend import attend
from prompt2prompt.cli import main
from prompt2prompt.concepts import MAX_CONCEPTS, ConceptOptions
from prompt2prompt.errors import InputError, PromptError
from prompt2prompt.families import FAMILIES as REGISTRY
from prompt2prompt.generation import GenerationOptions, generate
from prompt2prompt.store import RecordOptions
from prompt2prompt.testing import KINDS

OPTS = GenerationOptions(steps=3, seed=1, height=32, width=32, max_sequence_length=24)
PROMPTS = ["a red circle and a blue square", "a green cross"]
CONCEPTS = ("circle", "square", "red")


FAMILIES = [f.name for f in REGISTRY.values() if f.concepts is not None]  # the families with a concept stream
BUILT = [kind for kind in FAMILIES if kind in KINDS]  # those whose tiny pipeline this diffusers builds


@pytest.fixture(scope="module")
def sd3(joint_pipes):
    return joint_pipes["sd3"]


@pytest.mark.parametrize("kind", BUILT)
def test_the_image_with_concepts_is_the_image_without_them_and_shares_sum_to_one(joint_pipes, kind):
    pipe, side = joint_pipes[kind], REGISTRY[kind].tiny_side
    opts = dataclasses.replace(OPTS, height=side, width=side)  # 8x8 image tokens
    plain = generate(pipe, PROMPTS, None, opts, progress=False)
    r = attend(pipe, PROMPTS, opts, progress=False, concepts=list(CONCEPTS))
    assert torch.equal(r.generation.latents, plain.latents)  # bit for bit
    assert all(a.tobytes() == b.tobytes() for a, b in zip(r.images, plain.images))
    for kind in ("output", "cross"):
        maps = r.concept_maps(kind)
        assert maps.tensor.shape == (2, 8, 8, 3)  # 8x8 image tokens
        torch.testing.assert_close(maps.tensor.sum(-1), torch.ones(2, 8, 8))
        assert maps.concept("square", prompt=1).values.shape == (8, 8)
    assert r.settings["concepts"]["concepts"] == list(CONCEPTS) and r.settings["concepts"]["steps"] == [0, 3]
    assert not torch.equal(r.concept_maps("output").tensor, r.concept_maps("cross").tensor)


def _by_hand(pipe, prompt: str, concepts: tuple[str, ...], block_index: int):
    """The method re-stated at the first step, from the stock modules' own layers and plain softmax attention (no
    code of `concepts.py` or of the adapter): the concept tokens carried through the blocks before `block_index` as
    each block carries a prompt token, then that block's (image tokens, concepts) output-space scores."""
    net = pipe.transformer
    seen = {}

    def grab(i):
        def hook(module, args, kwargs):
            seen.setdefault(i, {k: v.clone() for k, v in kwargs.items() if torch.is_tensor(v)})

        return hook

    hooks = [b.register_forward_pre_hook(grab(i), with_kwargs=True) for i, b in enumerate(net.transformer_blocks)]
    try:
        generate(pipe, [prompt], None, OPTS, progress=False)
    finally:
        for hook in hooks:
            hook.remove()
    with torch.no_grad():
        words = []
        for c in concepts:
            embeds = pipe.encode_prompt(prompt=c, prompt_2=None, prompt_3=None, do_classifier_free_guidance=False)[0]
            words.append(embeds[0, 1])  # the tiny CLIP tokenizer reads each of these words as one token, after <start>
        stream = net.context_embedder(torch.stack(words))[None]  # (1, concepts, width)
        heads = net.transformer_blocks[0].attn.heads
        d = net.transformer_blocks[0].attn.to_q.out_features // heads

        def split(t):
            return t.view(1, -1, heads, d).transpose(1, 2)

        def merge(t):
            return t.transpose(1, 2).reshape(1, t.shape[2], heads * d)

        def attention(q, k, v):
            return torch.softmax(q @ k.transpose(-1, -2) / d**0.5, -1) @ v

        for i in range(block_index + 1):
            block, kw = net.transformer_blocks[i], seen[i]
            row = slice(1, 2)  # the conditional row: SD3's pipeline puts the unconditional one first
            x, ctx, temb = kw["hidden_states"][row], kw["encoder_hidden_states"][row], kw["temb"][row]
            attn = block.attn
            nx = block.norm1(x, emb=temb)[0]
            nctx = block.norm1_context(ctx, emb=temb)[0]
            nc, gate, shift, scale, gate_mlp = block.norm1_context(stream, emb=temb)
            qi, ki, vi = attn.norm_q(split(attn.to_q(nx))), attn.norm_k(split(attn.to_k(nx))), split(attn.to_v(nx))
            kt, vt = attn.norm_added_k(split(attn.add_k_proj(nctx))), split(attn.add_v_proj(nctx))
            qc = attn.norm_added_q(split(attn.add_q_proj(nc)))
            kc, vc = attn.norm_added_k(split(attn.add_k_proj(nc))), split(attn.add_v_proj(nc))
            concept_out = attention(qc, torch.cat([ki, kc], 2), torch.cat([vi, vc], 2))  # image and concept keys
            if i < block_index:  # the block's text side: gated attention output, then the gated feed-forward
                stream = stream + gate[:, None] * attn.to_add_out(merge(concept_out))
                normed = block.norm2_context(stream) * (1 + scale[:, None]) + shift[:, None]
                stream = stream + gate_mlp[:, None] * block.ff_context(normed)
        image_out = attention(qi, torch.cat([ki, kt], 2), torch.cat([vi, vt], 2))  # over the image and prompt keys
        return (merge(image_out) @ merge(concept_out).transpose(1, 2))[0]


@pytest.mark.parametrize("block", [0, 1])
def test_concept_maps_are_the_methods_formula_on_the_stock_modules(sd3, block):
    prompt = "a red circle and a blue square"
    expected = torch.softmax(_by_hand(sd3, prompt, CONCEPTS, block), -1).reshape(8, 8, 3)
    options = ConceptOptions(CONCEPTS, blocks=(block,), steps=(0.0, 0.34))
    r = attend(sd3, prompt, OPTS, progress=False, concepts=options)
    assert r.settings["concepts"]["blocks"] == [block] and r.settings["concepts"]["steps"] == [0, 1]
    torch.testing.assert_close(r.concept_maps().tensor[0], expected, atol=1e-5, rtol=1e-4)
    # a concept that is a prompt word too: its concept map is another quantity than the word's cross-attention map
    word = r.maps().word("circle").normalized()
    concept = r.concept_maps().concept("circle").normalized()
    assert word.shape == concept.shape and (word - concept).abs().max() > 0.05


def test_blocks_are_averaged_before_the_softmax(sd3):
    prompt = "a red circle and a blue square"
    mean = (_by_hand(sd3, prompt, CONCEPTS, 0) + _by_hand(sd3, prompt, CONCEPTS, 1)) / 2
    options = ConceptOptions(CONCEPTS, blocks=(0, 1), steps=(0.0, 0.34))
    r = attend(sd3, prompt, OPTS, progress=False, concepts=options)
    torch.testing.assert_close(r.concept_maps().tensor[0], torch.softmax(mean, -1).reshape(8, 8, 3), atol=1e-5,
                               rtol=1e-4)


def test_default_blocks_are_the_papers_on_flux_and_every_block_elsewhere():
    from prompt2prompt.concepts import default_blocks
    from prompt2prompt.families import FAMILIES

    assert list(default_blocks(FAMILIES["flux"].concepts, 19)) == [15, 16, 17, 18]  # ConceptAttention's layer_indices
    assert list(default_blocks(FAMILIES["flux"].concepts, 2)) == [0, 1]
    for name in ("sd3", "flux2", "qwenimage", "zimage"):
        assert list(default_blocks(FAMILIES[name].concepts, 24)) == list(range(24))


def test_p2p_attend_concepts_writes_pictures_tensors_and_settings(sd3, tmp_path, capsys):
    sd3.save_pretrained(tmp_path / "sd3")
    out = tmp_path / "out"
    main(["attend", PROMPTS[0], "--model", str(tmp_path / "sd3"), "--steps", "3", "--height", "32", "--width", "32",
          "--concepts", "circle", "square", "background", "--concept-blocks", "0", "2", "--quiet", "--out", str(out)])
    for name in ("concepts.png", "concepts_cross.png", "concepts_argmax.png", "image.png", "index.html"):
        assert (out / name).is_file(), name
    with safe_open(out / "concepts.safetensors", "pt") as f:
        assert f.get_tensor("maps").shape == (1, 8, 8, 3)
        meta = f.metadata()
    assert json.loads(meta["concepts"]) == ["circle", "square", "background"] and meta["kind"] == "output"
    settings = json.loads((out / "settings.json").read_text())
    assert settings["concepts"]["blocks"] == [0, 2] and settings["concepts"]["concepts"][2] == "background"
    assert "Concept maps" in (out / "index.html").read_text()


def test_bad_concepts_get_one_sentence(sd3, sd1, joint_pipes, tmp_path, capsys):
    with pytest.raises(InputError, match="need an MM-DiT"):
        attend(sd1, "a red circle", OPTS, progress=False, concepts=["circle"])
    # every MM-DiT has one but Flux.3, whose adapter has none yet: refused by name
    assert FAMILIES == [f.name for f in REGISTRY.values() if f.joint and f.name != "flux3"]
    import dataclasses

    from prompt2prompt import families

    pipe = joint_pipes["qwenimage"]
    try:  # any MM-DiT family whose adapter has no concept stream
        families._KNOWN[pipe] = dataclasses.replace(families.family_of(pipe), concepts=None)
        with pytest.raises(InputError, match="Qwen-Image has no concept stream yet"):
            attend(pipe, "a red circle", OPTS, progress=False, concepts=["circle"])
    finally:
        families._KNOWN.pop(pipe)
    if "flux3" in joint_pipes:
        with pytest.raises(InputError, match="Flux.3 has no concept stream yet"):
            attend(joint_pipes["flux3"], "a red circle", OPTS, progress=False, concepts=["circle"])
    with pytest.raises(InputError, match=f"at most {MAX_CONCEPTS} concepts, got {MAX_CONCEPTS + 1}"):
        ConceptOptions(tuple(f"w{i}" for i in range(MAX_CONCEPTS + 1)))
    with pytest.raises(InputError, match="'circle' is named twice"):
        ConceptOptions(("circle", "circle"))
    with pytest.raises(PromptError, match="list of words"):
        ConceptOptions("circle")
    with pytest.raises(InputError, match="joint block indices from 0 to 2, got 7"):
        attend(sd3, "a red circle", OPTS, progress=False, concepts=ConceptOptions(("circle",), blocks=(7,)))
    with pytest.raises(PromptError, match="control token"):  # a text the tokenizer would not read as text
        attend(sd3, "a red circle", OPTS, progress=False, concepts=["<|endoftext|>"])
    r = attend(sd3, "a red circle", OPTS, RecordOptions(self_attention=False), progress=False, concepts=["circle"])
    with pytest.raises(PromptError, match="not one of the concepts"):
        r.concept_maps().concept("square")
    with pytest.raises(InputError, match="no concepts were named"):
        attend(sd3, "a red circle", OPTS, progress=False).concept_maps()
    code = main(["attend", "a red circle", "--concepts", "circle", "--steps", "2", "--quiet", "--out",
                 str(tmp_path / "unet")])
    assert code == 2 and "concept maps need an MM-DiT" in capsys.readouterr().err
    assert not (tmp_path / "unet").exists()  # nothing half-written


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    import random

    from prompt2prompt.shapes import world

    folder = tmp_path_factory.mktemp("scenes")
    for k, caption in enumerate(("a red circle and a blue square", "a green cross and a yellow triangle")):
        world.scene_from_caption(caption, random.Random(k)).image().save(folder / f"{k}.png")
    return folder


@pytest.mark.parametrize("kind", BUILT)
def test_concept_maps_of_an_image_are_read_from_that_image(joint_pipes, scenes, kind):
    from prompt2prompt.concepts import image_concepts

    pipe, caption = joint_pipes[kind], "a red circle and a blue square"
    words, side = ["circle", "square", "background"], REGISTRY[kind].tiny_side  # 8x8 image tokens
    first = image_concepts(pipe, scenes / "0.png", caption, words, height=side, width=side)
    assert first.image.size == (side, side) and first.maps.settings["conversions"]  # 64x64 read at another size
    torch.testing.assert_close(first.maps.tensor.sum(-1), torch.ones(1, 8, 8))
    assert torch.equal(image_concepts(pipe, scenes / "0.png", caption, words, height=side, width=side).maps.tensor,
                       first.maps.tensor)  # the noise is seeded
    other = image_concepts(pipe, scenes / "1.png", caption, words, height=side, width=side)
    assert not torch.equal(other.maps.tensor, first.maps.tensor)  # the image's own latent is what is read
    noisier = image_concepts(pipe, scenes / "0.png", caption, words, noise=0.9, height=32, width=32)
    assert not torch.equal(noisier.maps.tensor, first.maps.tensor) and noisier.maps.settings["noise"] == 0.9
    assert not torch.equal(first.cross.tensor, first.maps.tensor) and first.cross.kind == "cross"


def test_p2p_attend_image_writes_its_maps_and_refuses_what_does_nothing(sd3, scenes, tmp_path, capsys):
    sd3.save_pretrained(tmp_path / "sd3")
    base = ["attend", "a red circle and a blue square", "--model", str(tmp_path / "sd3"), "--height", "32",
            "--width", "32", "--quiet"]
    out = tmp_path / "out"
    assert main([*base, "--image", str(scenes / "0.png"), "--concepts", "circle", "square", "--noise", "0.3",
                 "--out", str(out)]) == 0
    for name in ("image.png", "concepts.png", "concepts_cross.png", "concepts_argmax.png", "concepts.safetensors",
                 "index.html"):
        assert (out / name).is_file(), name
    settings = json.loads((out / "settings.json").read_text())
    assert settings["noise"] == 0.3 and settings["concepts"]["concepts"] == ["circle", "square"]
    capsys.readouterr()
    for extra, said in [(["--image", str(scenes / "0.png")], "expected --concepts"),
                        (["--noise", "0.3", "--concepts", "circle"], "expected it with --image"),
                        (["--image", str(scenes / "0.png"), "--concepts", "circle", "--steps", "3"],
                         "--steps does nothing with --image"),
                        (["--image", str(tmp_path / "none.png"), "--concepts", "circle"], "no image file")]:
        assert main([*base, *extra, "--out", str(tmp_path / "bad")]) == 2
        assert said in capsys.readouterr().err
        assert not (tmp_path / "bad").exists()


def _identity_rotary(kind: str, rotary, text: int, concepts: int):
    """The block's rotary input with the prompt's positions replaced by the concepts' (no rotation: position 0)."""
    if kind == "qwenimage":  # (image frequencies, text frequencies), complex
        image, words = rotary
        return image, torch.ones(concepts, words.shape[-1], dtype=words.dtype)
    cos, sin = rotary  # Flux: (text + image positions, head_dim), text first
    return (torch.cat([torch.ones(concepts, cos.shape[-1], dtype=cos.dtype), cos[text:]]),
            torch.cat([torch.zeros(concepts, sin.shape[-1], dtype=sin.dtype), sin[text:]]))


@pytest.mark.parametrize("kind", BUILT)
def test_the_concept_stream_is_each_stock_block_with_the_concepts_as_its_text(joint_pipes, kind, monkeypatch):
    """An independent check of every family's stream (not its maps: the map formula is the SD3 by-hand test's): since
    a concept attends to the image and the concepts only, the stream after a block is what the stock block makes of
    the concepts given as its whole text (its image side's output, which then attends to the concepts, is not used)."""
    from prompt2prompt.families import family_of

    pipe = joint_pipes[kind]
    adapter = family_of(pipe).concepts
    seen = []
    original = adapter.step

    def recording(block, call, rows, stream, read, grid):
        after, maps = original(block, call, rows, stream, read, grid)
        if len(seen) < len(adapter.blocks(pipe.transformer)):  # the first step's blocks
            seen.append((block, dict(call), rows, stream.clone(), None if after is None else after.clone(), grid))
        return after, maps

    monkeypatch.setattr(adapter, "step", staticmethod(recording))
    attend(pipe, PROMPTS[0], OPTS, RecordOptions(self_attention=False), progress=False, concepts=list(CONCEPTS))
    monkeypatch.undo()
    checked = 0
    with torch.no_grad():
        for block, call, rows, stream, after, grid in seen:
            if after is None:  # SD3's last block has no text output
                continue
            c = stream.shape[1]
            if kind == "zimage":
                n = grid[0] * grid[1]
                x = torch.cat([call["x"][rows][:, :n], stream], 1)
                freqs = call["freqs_cis"][rows][:, :n]
                freqs = torch.cat([freqs, torch.ones(freqs.shape[0], c, freqs.shape[-1], dtype=freqs.dtype)], 1)
                expected = block(x, None, freqs, call["adaln_input"][rows])[:, n:]
            elif kind == "qwenimage21":  # one sequence: the image's tokens, then the concepts as text (no rotary,
                n = grid[0] * grid[1]  # modulated as text), every token attending to every one
                x = torch.cat([call["hidden_states"][rows][:, -n:], stream], 1)
                freqs = call["rotary_emb"][-n:]
                freqs = torch.cat([freqs, torch.ones(c, freqs.shape[-1], dtype=freqs.dtype)])
                modulation = torch.cat([call["modulation"][rows], call["modulation"][-1:]])
                target = torch.cat([torch.ones(n, dtype=torch.bool), torch.zeros(c, dtype=torch.bool)])
                expected = block(hidden_states=x, modulation=modulation, rotary_emb=freqs,
                                 target_token_mask=target)[:, n:]
            else:
                kwargs = {k: (v[rows] if torch.is_tensor(v) and v.shape[0] > 1 else v) for k, v in call.items()
                          if k not in ("joint_attention_kwargs", "attention_kwargs")}
                kwargs["encoder_hidden_states"] = stream
                if kwargs.get("image_rotary_emb") is not None:
                    text = call["encoder_hidden_states"].shape[1]
                    kwargs["image_rotary_emb"] = _identity_rotary(kind, kwargs["image_rotary_emb"], text, c)
                if "encoder_hidden_states_mask" in kwargs:
                    kwargs["encoder_hidden_states_mask"] = None
                expected = block(**kwargs)[0]  # (text output, image output)
            torch.testing.assert_close(after, expected, atol=2e-5, rtol=1e-4)
            checked += 1
    assert checked >= 2
