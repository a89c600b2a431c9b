"""
Tests of the real-data path: MATH/GSM8K answer extraction, equivalence and loading (on ../shared/realdata when
present), and tiny random Llama, Qwen2, GPT-2 and GPT-NeoX models saved as Hugging Face folders.

    python -m pytest -q test_real.py
"""
import json
import os
import re
import subprocess
import sys
import threading
import time

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

HERE = os.path.dirname(os.path.abspath(__file__))


# ---- real data: extraction, equivalence, loading

REALDATA = os.path.join(HERE, "..", "shared", "realdata")


@pytest.mark.parametrize("text, answer", [
    ("so $\\boxed{5}$.", "5"),
    ("first \\boxed{2}, then \\boxed{4}", "4"),                                   # the last box wins
    ("$\\boxed{\\frac{\\sqrt{3}}{2}}$", "\\frac{\\sqrt{3}}{2}"),                  # nested braces
    ("\\boxed{\\{1\\pm\\sqrt{5},-2\\}}", "\\{1\\pm\\sqrt{5},-2\\}"),              # escaped braces inside
    ("the answer is \\fbox{(1,2)}", "(1,2)"),
    ("so $\\boxed 7$ pencils", "7"),                                             # \boxed without braces
    ("half \\boxed{\\frac12", None),                                             # never closed
    ("Janet makes 9 * 2 = $<<9*2=18>>18\n#### 18", "18"),
    ("#### 1,000", "1000"),                                                      # GSM8K thousands comma
    ("so -3 dollars\n#### -3", "-3"),
    ("no final answer here", None),
    (None, None),
])
def test_extract_answer(text, answer):
    assert math_data.extract_answer(text) == answer


EQUIVALENCE = [
    ("\\frac{1}{2}", "\\dfrac{1}{2}", True),
    ("\\frac12", "\\frac{1}{2}", True),
    ("\\frac1b", "\\frac{1}{b}", True),
    ("\\tfrac{3}{4}", "0.75", True),
    ("0.5", "\\frac{1}{2}", True),
    ("1/2", "\\frac{1}{2}", True),
    ("-\\frac{1}{2}", "-0.5", True),
    ("\\sqrt3", "\\sqrt{3}", True),
    ("2\\sqrt2", "2 \\sqrt{2}", True),
    ("5\\text{ cm}", "5", True),
    ("864 \\mbox{ inches}^2", "864", True),
    ("\\frac{270}7\\text{ degrees}", "\\frac{270}{7}", True),
    ("\\text{(C)}", "C", True),
    ("\\text{Evelyn}", "Evelyn", True),
    ("90^\\circ", "90", True),
    ("90^{\\circ}", "90", True),
    ("\\$18.90", "18.9", True),
    ("50\\%", "50", True),
    ("50%", "50", True),
    ("1,000", "1000", True),
    ("10,\\!080", "10080", True),
    ("11,\\! 111,\\! 111,\\! 100", "11111111100", True),
    ("10{,}000", "10000", True),
    ("x = 5", "5", True),
    ("k=-3", "-3", True),
    ("5.", "5", True),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})", True),
    ("[2, 5)", "[2,5)", True),
    ("(-\\infty, 0]", "(-\\infty,0]", True),
    ("-7", "-7.0", True),
    ("3\\!\\cdot\\!4", "3\\cdot4", True),
    ("(1,2)", "(2,1)", False),                                                  # order matters in a tuple
    ("(1,2)", "12", False),                                                     # a tuple is not a number
    ("[2,5)", "(2,5)", False),                                                  # open vs closed interval
    ("0.33", "\\frac{1}{3}", False),                                            # close is not equal
    ("-5", "5", False),
    ("\\sqrt{2}", "\\sqrt{3}", False),
    ("\\frac{1}{2}", "\\frac{2}{1}", False),
    ("x+1", "x-1", False),
    ("1/0", "\\frac{1}{0}", False),                                             # not numbers: no division by 0
    ("1/0", "2/0", False),
    ("1" + "0" * 400, "2" + "0" * 400, False),                                  # beyond float range: not both inf
    (None, "5", False),
    ("5", None, False),
    ("", "", False),
    ("\\boxed{", "}}{{", False),                                                # garbage: False, no error
]


def boxed_is_correct(pred, gold):
    """The grader (math-verify, is_equiv where it reads nothing) on a solution that is just pred in a \\boxed{}."""
    return math_data.is_correct(None if pred is None else f"\\boxed{{{pred}}}", gold)


@pytest.mark.parametrize("equal", [math_data.is_equiv, boxed_is_correct])   # hand-written, and the grader
@pytest.mark.parametrize("pred, gold, same", EQUIVALENCE)
def test_is_equiv(pred, gold, same, equal):
    assert equal(pred, gold) is same
    assert equal(gold, pred) is same


# Model-style solutions labelled by hand: (solution as a model writes it, reference answer, is it right).
JANET = "Janet sells 16 - 3 - 4 = 9 eggs a day at $2 each, so she makes 9 * 2 = 18 dollars.\n"
LABELLED = [
    (JANET + "#### 18", "18", True),
    (JANET + "#### 19", "18", False),                                # the right number earlier, a wrong final one
    (JANET + "The answer is 18.", "18", True),
    (JANET + "She gives 1 to her mother, so the answer is 17.", "18", False),
    (JANET + "A: 18", "18", True),
    (JANET + "A: 17", "18", False),
    ("To find the answer, 9 * 2 = 18 dollars.\nA: 19", "18", False),   # 'A: N' last: not math-verify's "answer ... ="
    ("A: 16 - 3 - 4 = 9 eggs, and 9 * 2 = 18. The answer is 18.", "18", True),   # 'A:' opening a worked answer
    (JANET + "**18**", "18", True),
    ("**Answer:** 18 dollars", "18", True),
    ("She has 18 apples.", "18", True),                              # units after the number
    ("She had 18 apples and ate 2, so 16 apples.", "18", False),
    ("She has $18.00 left.", "18", True),
    ("She has $18.50 left.", "18", False),
    (JANET + "The final answer is $\\boxed{18}$.", "18", True),
    ("First 18, then 9 * 2 + 1 = 19.\nThe answer is 19. I hope it helps!", "18", False),
    ("The answer is 18. Let me know if you have other questions!", "18", True),
    ("The total is 1,200 dollars.", "1200", True),                   # thousands commas
    ("It costs 1000 + 200 = 1,200.\n#### 1,200", "1200", True),
    ("So she pays $1,200.00.", "1200", True),
    ("The answer is 1,210.", "1200", False),
    ("The answer is 12,000.", "1200", False),
    ("So 25% of the students walk.", "25", True),                   # a percent
    ("The answer is 25 percent.", "25", True),
    ("So 75% of the students walk.", "25", False),
    ("The temperature is -3 degrees.", "-3", True),                 # negative numbers
    ("It drops by 3 degrees, so the answer is 3.", "-3", False),
    ("$x = \\boxed{-3}$", "-3", True),
    ("So $x = \\frac{1}{2}$, i.e. $\\boxed{0.5}$.", "\\frac{1}{2}", True),   # fractions
    ("The answer is 1/2.", "\\frac{1}{2}", True),
    ("so $\\boxed{\\dfrac12}$", "0.5", True),
    ("The final answer is $\\frac{1}{3}$. I hope it is correct.", "\\frac{1}{2}", False),
    ("\\boxed{2}", "\\frac{1}{2}", False),
    ("The final answer is $\\frac{3}{4}$. I hope it is correct.", "0.75", True),
    ("Hence $x \\in \\boxed{[2, 5)}$.", "[2,5)", True),                      # intervals
    ("Hence $x \\in \\boxed{(2, 5)}$.", "[2,5)", False),
    ("$\\boxed{(-\\infty, 0]}$", "(-\\infty,0]", True),
    ("The point is $\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}$.", "(3,\\frac{\\pi}{2})", True),   # tuples
    ("The point is $\\boxed{(\\frac{\\pi}{2}, 3)}$.", "(3,\\frac{\\pi}{2})", False),
    ("$\\boxed{(2,1)}$", "(1,2)", False),
    ("The roots are $\\boxed{5, 3}$.", "3, 5", True),
    ("The answer is $\\boxed{C}$.", "\\text{(C)}", True),           # multiple choice
    ("\\boxed{\\text{(C)}}", "\\text{(C)}", True),
    ("\\boxed{(D)}", "\\text{(C)}", False),
    ("\\boxed{\\text{Evelyn}}", "\\text{Evelyn}", True),
    ("\\boxed{\\text{Bob}}", "\\text{Evelyn}", False),
    ("so $\\boxed{\\sqrt{8}}$", "2\\sqrt{2}", True),               # radicals
    ("so $\\boxed{2\\sqrt{3}}$", "2\\sqrt{2}", False),
    ("The side is $\\boxed{5\\text{ cm}}$.", "5", True),            # units, degrees
    ("The angle is $\\boxed{90^\\circ}$.", "90", True),
    ("$\\boxed{(x+1)^2}$", "x^2+2x+1", True),                       # expressions
    ("$\\boxed{(x-1)^2}$", "x^2+2x+1", False),
    ("so the answer is \\boxed{5.}", "5", True),                   # math-verify reads nothing: the fallback reads it
    ("I do not know.", "18", False),
    ("", "18", False),
    (None, "18", False),
    ("\\boxed{", "18", False),
]


@pytest.mark.parametrize("text, answer, right", LABELLED)
def test_is_correct_reads_answers_as_models_write_them(text, answer, right):
    assert math_data.is_correct(text, answer) is right


def test_grading_off_the_main_thread_and_past_the_time_limit(monkeypatch):
    """math-verify's time limit is a SIGALRM, which only the main thread may set: a thread grades without one."""
    graded = []
    worker = threading.Thread(target=lambda: graded.append(math_data.is_correct("The answer is 1,200.", "1200")))
    worker.start()
    worker.join()
    assert graded == [True]
    monkeypatch.setattr(math_data, "TIMEOUT_S", 1)
    start = time.time()
    assert math_data.is_correct("\\boxed{10^{10^{10}}}", "5") is False       # sympy would hang: cut off, wrong
    assert time.time() - start < 4


def test_load_jsonl_reads_both_formats_and_skips_blank_lines(tmp_path):
    path = tmp_path / "mixed.jsonl"
    rows = [{"problem": "1+1?", "solution": "It is $\\boxed{2}$.", "type": "Algebra", "level": "Level 1"},
            {"problem": "2+2?", "solution": "4", "answer": "4", "subject": "Prealgebra", "level": 1},
            {"question": "How many?", "answer": "Some.\n#### 1,200"}]
    path.write_text("\n".join(json.dumps(r) for r in rows[:2]) + "\n\n" + json.dumps(rows[2]) + "\n", encoding="utf-8")
    assert math_data.load_jsonl(str(path)) == [
        {"domain": "Algebra", "problem": "1+1?", "solution": "It is $\\boxed{2}$.", "answer": "2"},
        {"domain": "Prealgebra", "problem": "2+2?", "solution": "4", "answer": "4"},
        {"domain": "gsm8k", "problem": "How many?", "solution": "Some.\n#### 1,200", "answer": "1200"}]


@pytest.mark.parametrize("content, message", [
    (None, "no such file"),
    (b"", "empty file"),
    (b"\n  \n", "empty file"),
    (b'{"question": "q", "answer": "#### 1"}\n{"question": "caf\xe9"}\n', ":2: not UTF-8"),
    (b'{"question": "q", "answer": "#### 1"}\n\n{"question": \n', ":3: not JSON"),
    (b'[1, 2]\n', ":1: a row must be a JSON object"),
    (b'{"problem": "p", "type": "Algebra"}\n', ":1: missing or non-string field(s) solution"),
    (b'{"problem": "p", "solution": "s"}\n', ":1: missing or non-string field(s) type"),
    (b'{"problem": "p", "solution": "no box", "type": "Algebra"}\n', ":1: no 'answer' field"),
    (b'{"question": "q"}\n', ":1: missing or non-string field(s) answer"),
    (b'{"question": "q", "answer": "just 5"}\n', ":1: the GSM8K answer has no final '#### N'"),
    (b'{"text": "hello"}\n', ":1: neither MATH"),
])
def test_load_jsonl_errors_name_file_and_line(tmp_path, content, message):
    path = tmp_path / "data.jsonl"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ValueError) as error:
        math_data.load_jsonl(str(path))
    assert str(path) in str(error.value) and message in str(error.value) and "\n" not in str(error.value)


def realdata(name):
    """The path of a file of ../shared/realdata, or a clean skip where that folder is absent."""
    if not os.path.isdir(REALDATA):
        pytest.skip(f"no real data at {REALDATA}")
    return os.path.join(REALDATA, name)


def test_realdata_math500_extraction_agrees_with_answers():
    rows = math_data.load_jsonl(realdata("math500_test.jsonl"))
    wrong = [r["answer"] for r in rows if not math_data.is_equiv(math_data.extract_answer(r["solution"]), r["answer"])]
    assert len(rows) == 500 and len(wrong) <= 1, wrong


def test_realdata_gsm8k_extracts_every_final_number():
    rows = math_data.load_jsonl(realdata("gsm8k_test.jsonl"))
    finals = [r["solution"].split("####")[-1].strip().replace(",", "") for r in rows]
    assert len(rows) == 1319 and [math_data.extract_answer(r["solution"]) for r in rows] == finals
    assert all(r["answer"] == f and r["domain"] == "gsm8k" and re.fullmatch(r"-?\d+", f) for r, f in zip(rows, finals))


def model_style_endings(solution, n):
    """A GSM8K reference solution with its '#### N' line rewritten as models end theirs, final answer n."""
    body = re.sub(r"<<[^>]*>>", "", solution.rsplit("####", 1)[0]).strip()    # no calculator annotations
    return [f"{body}\n{end}" for end in [f"#### {n}", f"The answer is {n}.", f"A: {n}", f"**{n}**", f"${n:,}",
            f"So the answer is ${n}.00.", f"{n:,} dollars", f"The final answer is $\\boxed{{{n}}}$.",
            f"\nAnswer: {n:,}", f"Therefore, she has {n} apples left."]]


def test_realdata_gsm8k_model_style_endings_are_graded():
    """Each row's solution ending in 10 forms with its answer N (right) and N + 1 (wrong): is_correct must agree with
    these labels on 99%. MASS_GRADE_ROWS=1319 grades all of GSM8K's test set (-s prints agreement and time)."""
    rows = math_data.load_jsonl(realdata("gsm8k_test.jsonl"))[:int(os.environ.get("MASS_GRADE_ROWS", "25"))]
    start, graded = time.time(), []
    for row in rows:
        for shown, right in [(int(row["answer"]), True), (int(row["answer"]) + 1, False)]:
            graded += [math_data.is_correct(text, row["answer"]) is right
                       for text in model_style_endings(row["solution"], shown)]
    print(f"\n{len(rows)} rows, {len(graded)} solutions: agreement {sum(graded) / len(graded):.2%}, "
          f"{time.time() - start:.1f} s")
    assert sum(graded) >= 0.99 * len(graded)


def test_realdata_math_train_sample_loads_with_answers():
    rows = math_data.load_jsonl(realdata("math_train_sample.jsonl"))
    assert len(rows) == 1000 and all(r["answer"] is not None and r["domain"] for r in rows)



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


@pytest.mark.parametrize("text, parsed", [
    ("Problem: What is 2+3?\nSolution: 2+3=5, so $\\boxed{5}$.", ("What is 2+3?", "2+3=5, so $\\boxed{5}$.")),
    ("Sure!\n**Problem:** Find x.\n**Solution:** x = 2, so \\boxed{2}", ("Find x.", "x = 2, so \\boxed{2}")),
    ("Problem: a train problem\nSolution: 3 hours\n#### 3", ("a train problem", "3 hours\n#### 3")),
    ("Problem: What is 2+3?\nSolution: it is 5.", ("What is 2+3?", "it is 5.")),   # its last number is an answer
    ("Problem: \nSolution: \\boxed{5}", None),                                  # no problem
    ("Problem: What is 2+3? \\boxed{5}", None),                                 # no solution part
    # as small instruct models write them
    ("**Problem 1:** What is 4+4?\n**Solution 1:** The answer is 8.", ("What is 4+4?", "The answer is 8.")),
    ("### Problem\nWhat is 4+4?\n\n### Solution\n4 + 4 = 8\n#### 8", ("What is 4+4?", "4 + 4 = 8\n#### 8")),
    ("**Practice Problem:** What is 4+4?\n\n**Solution:**\n4 + 4 = **8**", ("What is 4+4?", "4 + 4 = **8**")),
    ("Sure! Here is a new practice problem: What is 4+4?\nSolution: 8", ("What is 4+4?", "8")),
    ("Question: What is 4+4?\nAnswer: 4 + 4 = 8.\nA: 8", ("What is 4+4?", "4 + 4 = 8.\nA: 8")),
    ("Q: What is 4+4?\nA: 8", ("What is 4+4?", "8")),
    ("problem: what is 4+4?\nsolution: it is $\\frac{16}{2}$", ("what is 4+4?", "it is $\\frac{16}{2}$")),
    ("Problem: Problem solving: what is 4+4?\nSolution: 8", ("Problem solving: what is 4+4?", "8")),
    ("Problem: What is 4+4?\nSolution: 4+4=8.\n\nProblem 2: What is 5+5?\nSolution: 10", ("What is 4+4?", "4+4=8.")),
    ("Problem: What is 3+4?\nSolution: In this problem: 3 + 4 = 7.", ("What is 3+4?", "In this problem: 3 + 4 = 7.")),
    ("Problem: Find a: b if a = 2b.\nSolution: It is 2.", ("Find a: b if a = 2b.", "It is 2.")),   # 'A:' opens a line
    ("Problem: What is 4+4?\nSolution: It is eight.", None),                    # no final answer
    ("Problem: 3\nSolution: 2", None),                                           # no problem in words
    ("Problem: How far does James run?\n\nI'm ready to help.", None),          # no solution
    ("A farmer has 5 cows. How many legs?\nThey have 20 legs.", None),           # no labels
    ("Solution: \\boxed{5}\nProblem: What is 2+3?", None),                       # the solution before the problem
])
def test_worked_examples_parse(text, parsed):
    assert math_data.parse_worked(text) == parsed


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


def test_natural_sft_example_trains_on_its_solution_and_eos(hf_models):
    model, tok = base_model.load(hf_models["llama"])
    example = {"valid": True, "problem": "What is 1+2?", "answer": "1+2=3, so \\boxed{3}.", "greedy": "It is \\boxed{3.0}"}
    valid, prompts, answers, consistent = training_pairs(MathWorld(None, None, 1), [example], "sample", tok)
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
    assert set(results["methods"]["no_adapt"]["by_domain"]) == {"Algebra", "Prealgebra", "Number Theory"}
    assert {n.split(".")[-2] for n in torch.load(out / "psi.pt")} == set(ARCHS[arch])   # "<module>.A" and ".B"
    assert (out / "metrics.jsonl").exists() and not (out / "base").exists()


def test_train_real_model_with_valid_examples(hf_models, math_jsonl, tmp_path, monkeypatch):
    """A random model writes no valid worked example, so decoding is replaced by one canned reply: the meta-step
    then runs on natural-language examples, and grading counts exactly the one target whose answer is 3."""
    reply = "Problem: What is $1+2$?\nSolution: $1+2=3$, so $\\boxed{3}$."
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
