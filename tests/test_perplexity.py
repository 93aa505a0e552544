"""common.eval.perplexity: equals exp(mean CE) computed by hand; the layer-by-layer path equals the plain one."""
import math

import pytest
import torch
import torch.nn.functional as F

from common.eval.perplexity import perplexity
from fixtures import make_tiny_causal_lm


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model(request, tmp_path_factory):
    from transformers import AutoModelForCausalLM
    d = make_tiny_causal_lm(request.param, tmp_path_factory.mktemp(request.param))
    return AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def windows(model):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, model.config.vocab_size, (5, 24), generator=g)


def test_matches_hand_computation(model, windows):
    with torch.no_grad():
        losses = [F.cross_entropy(model(w[None]).logits[0, :-1], w[1:]) for w in windows]
    expected = math.exp(torch.stack(losses).mean().item())
    for bsz in (1, 2, 5):
        assert perplexity(model, windows, bsz=bsz, device="cpu") == pytest.approx(expected, rel=1e-5)


def test_layerwise_equals_plain(model, windows):
    plain = perplexity(model, windows, bsz=2, device="cpu")
    layered = perplexity(model, windows, bsz=2, device="cpu", layerwise=True)
    assert layered == pytest.approx(plain, rel=1e-5)
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert isinstance(model.model.layers[0], type(model.model.layers[1]))  # layers restored


def test_bad_windows(model):
    with pytest.raises(ValueError, match="LongTensor"):
        perplexity(model, torch.zeros(2, 8), device="cpu")


# --- lm-eval adapter (common.eval.lm_eval_runner): argument checks and a custom task over a local jsonl file ---

MC_ROWS = [{"question": "The model layer", "choices": ["weight is quantized.", "zebra banana."], "answer": 0},
           {"question": "The hessian", "choices": ["matrix inverse.", "purple sky."], "answer": 1},
           {"question": "A small", "choices": ["model.", "xylophone sequence."], "answer": 0}]


def _local_task(model, tmp_path, task: str, rows: list[dict], spec: str):
    """A custom lm-eval task `task` over `rows` written as a local jsonl file (YAML body `spec`), and the
    model's tokenizer; skipped for all but the llama model (one architecture is enough)."""
    import json

    from transformers import AutoTokenizer
    if model.config.model_type != "llama":
        pytest.skip("one architecture is enough")
    data = tmp_path / f"{task}.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / f"{task}.yaml").write_text(
        f"task: {task}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n" + spec)
    return AutoTokenizer.from_pretrained(model.name_or_path)


def test_lm_eval_bad_arguments(model):
    from common.eval.lm_eval_runner import run_lm_eval
    with pytest.raises(ValueError, match="batch_size"):
        run_lm_eval(model, None, ["piqa"], 0, "cpu")
    with pytest.raises(ValueError, match="tasks"):
        run_lm_eval(model, None, "piqa", 1, "cpu")
    with pytest.raises(ValueError, match="include_path"):
        run_lm_eval(model, None, ["piqa"], 1, "cpu", include_path="/nonexistent/tasks")


def test_lm_eval_local_task_matches_hand_computation(model, tmp_path):
    from common.eval.lm_eval_runner import run_lm_eval
    tok = _local_task(
        model, tmp_path, "tiny_local_mc", MC_ROWS,
        "output_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    res = run_lm_eval(model, tok, ["tiny_local_mc"], 2, "cpu", include_path=tmp_path)

    def loglik(context, choice):  # lm-eval: continuation = target delimiter " " + choice, split off the context
        ctx = tok(context, add_special_tokens=False).input_ids
        whole = tok(context + " " + choice, add_special_tokens=False).input_ids
        n = len(whole) - len(ctx)
        ids = torch.tensor([whole])
        with torch.no_grad():
            logp = model(ids).logits[0, :-1].log_softmax(-1)
        return logp[-n:].gather(-1, ids[0, -n:, None]).sum().item()

    hits = [max(range(2), key=lambda c: loglik(r["question"], r["choices"][c])) == r["answer"] for r in MC_ROWS]
    assert res["tiny_local_mc"]["acc"] == pytest.approx(sum(hits) / len(hits))
    assert res["average"]["score"] == res["tiny_local_mc"]["acc"]


def test_lm_eval_summary_of_generation_and_choice_tasks():
    from common.eval.lm_eval_runner import _summarize, task_score
    results = {"arc_challenge": {"acc,none": 0.40, "acc_norm,none": 0.45, "alias": "arc_challenge"},
               "gsm8k": {"exact_match,strict-match": 0.25, "exact_match_stderr,strict-match": "N/A",
                         "exact_match,flexible-extract": 0.30, "alias": "gsm8k"}}
    out = _summarize(results, ["arc_challenge", "gsm8k"])
    assert out["gsm8k"] == {"exact_match,strict-match": 0.25, "exact_match,flexible-extract": 0.30}
    assert task_score(out["arc_challenge"]) == 0.45 and task_score(out["gsm8k"]) == 0.25
    assert out["average"]["score"] == pytest.approx((0.45 + 0.25) / 2)
    with pytest.raises(RuntimeError, match="exact_match"):
        _summarize({"x": {"bleu,none": 1.0}}, ["x"])


GEN_ROWS = [{"question": "one plus one", "answer": "2"}, {"question": "two plus two", "answer": "4"},
            {"question": "three plus three", "answer": "6"}]


def test_lm_eval_few_shot_generation_task_with_chat_template(model, tmp_path):
    """A GSM8K-like generate_until task over a local file, 1-shot, prompts through a chat template: the runner
    runs end to end and returns exact_match for both answer filters, the strict one as the headline."""
    from common.eval.lm_eval_runner import run_lm_eval
    tok = _local_task(
        model, tmp_path, "tiny_local_gen", GEN_ROWS,
        "fewshot_split: test\noutput_type: generate_until\n"
        "doc_to_text: 'Q: {{question}} A:'\ndoc_to_target: '{{answer}}'\n"
        "generation_kwargs:\n  until: ['Q:']\n  do_sample: false\n  max_gen_toks: 4\n"
        "filter_list:\n  - name: strict-match\n    filter:\n      - function: regex\n        regex_pattern: '(\\d+)'\n"
        "      - function: take_first\n  - name: flexible-extract\n    filter:\n      - function: take_first\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n")
    with pytest.raises(ValueError, match="chat template"):
        run_lm_eval(model, tok, ["tiny_local_gen"], 1, "cpu", include_path=tmp_path, num_fewshot=1,
                    chat_template=True)
    with pytest.raises(ValueError, match="num_fewshot"):
        run_lm_eval(model, tok, ["tiny_local_gen"], 1, "cpu", include_path=tmp_path, num_fewshot=-1)
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }}\n{% endfor %}"
    res = run_lm_eval(model, tok, ["tiny_local_gen"], 1, "cpu", include_path=tmp_path, num_fewshot=1,
                      chat_template=True)
    scores = res["tiny_local_gen"]
    assert set(scores) == {"exact_match,strict-match", "exact_match,flexible-extract"}
    assert all(0.0 <= v <= 1.0 for v in scores.values())
    assert res["average"]["score"] == scores["exact_match,strict-match"]
