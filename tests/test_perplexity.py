"""common.perplexity: equals exp(mean CE) computed by hand; the layer-by-layer path equals the plain one."""
import math

import pytest
import torch
import torch.nn.functional as F

from common.perplexity import perplexity
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


# --- lm-eval adapter (common.lm_eval_runner): argument checks and a custom task over a local jsonl file ---

MC_ROWS = [{"question": "The model layer", "choices": ["weight is quantized.", "zebra banana."], "answer": 0},
           {"question": "The hessian", "choices": ["matrix inverse.", "purple sky."], "answer": 1},
           {"question": "A small", "choices": ["model.", "xylophone sequence."], "answer": 0}]


def test_lm_eval_bad_arguments(model):
    from common.lm_eval_runner import run_lm_eval
    with pytest.raises(ValueError, match="batch_size"):
        run_lm_eval(model, None, ["piqa"], 0, "cpu")
    with pytest.raises(ValueError, match="tasks"):
        run_lm_eval(model, None, "piqa", 1, "cpu")
    with pytest.raises(ValueError, match="include_path"):
        run_lm_eval(model, None, ["piqa"], 1, "cpu", include_path="/nonexistent/tasks")


def test_lm_eval_local_task_matches_hand_computation(model, tmp_path):
    import json

    from transformers import AutoTokenizer

    from common.lm_eval_runner import run_lm_eval
    if model.config.model_type != "llama":
        pytest.skip("one architecture is enough")
    tok = AutoTokenizer.from_pretrained(model.name_or_path)
    data = tmp_path / "mc.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in MC_ROWS) + "\n")
    (tmp_path / "tiny_mc.yaml").write_text(
        f"task: tiny_local_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
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
    assert res["average"]["acc_or_acc_norm"] == res["tiny_local_mc"]["acc"]
