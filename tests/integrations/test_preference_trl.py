"""losskit losses inside TRL's DPOTrainer; skipped when TRL is not installed."""

import time

import pytest
import torch

trl = pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")
tokenizers = pytest.importorskip("tokenizers")

import losskit  # noqa: E402
from losskit.integrations.trl import LosskitDPOTrainer  # noqa: E402

WORDS = ["good", "bad", "fine", "awful", "great", "poor", "ok", "meh", "the", "film", "was", "is", "plot"]


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<unk>"] + WORDS)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", pad_token="<pad>",
                                                unk_token="<unk>")


def tiny_model(vocab, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                                   pad_token_id=0, eos_token_id=1, bos_token_id=1)
    return transformers.LlamaForCausalLM(cfg)


def tiny_dataset(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)

    def words(k):
        return " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (k,), generator=g))

    rows = {"prompt": [], "chosen": [], "rejected": [], "sample_weight": [], "reward_margin": []}
    for i in range(n):
        rows["prompt"].append("the film " + words(2))
        rows["chosen"].append(" " + words(1 + i % 4))  # different lengths: exercises length normalisation
        rows["rejected"].append(" " + words(2 + (i * 3) % 5))
        rows["sample_weight"].append(0.5 + (i % 3) * 0.5)
        rows["reward_margin"].append(-2.0 + 0.5 * i)
    return datasets.Dataset.from_dict(rows)


def make(trainer_cls, tmp_path, loss_type="sigmoid", **kw):
    tok = tiny_tokenizer()
    model = tiny_model(len(tok), seed=0)
    ref = tiny_model(len(tok), seed=1)  # a different reference, so h != 0 and the losses are not constants
    args = trl.DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, learning_rate=1e-2,
                         report_to="none", logging_steps=1, save_strategy="no", beta=0.3, loss_type=[loss_type],
                         label_smoothing=0.2 if loss_type == "robust" else 0.0, use_cpu=True, seed=0,
                         remove_unused_columns=True)
    ds = tiny_dataset()
    if trainer_cls is trl.DPOTrainer:
        ds = ds.remove_columns(["sample_weight", "reward_margin"])
    return trainer_cls(model=model, ref_model=ref, args=args, train_dataset=ds, processing_class=tok, **kw)


def first_batch(trainer):
    batch = next(iter(trainer.get_train_dataloader()))
    return trainer._prepare_inputs(batch)


@pytest.mark.parametrize("loss_type,name,hp", [
    ("sigmoid", "dpo", {}),
    ("hinge", "hinge", {}),
    ("ipo", "ipo", {}),  # TRL length-normalises; losskit's ipo does so when lengths are given (the trainer passes them)
    ("robust", "robust", {"epsilon": 0.2}),
])
def test_agrees_with_trl_formulas(tmp_path, loss_type, name, hp):
    ours = make(LosskitDPOTrainer, tmp_path / "a", losskit_loss=losskit.get(name, beta=0.3, **hp),
                extra_columns=())
    theirs = make(trl.DPOTrainer, tmp_path / "b", loss_type=loss_type)
    batch = first_batch(theirs)
    with torch.no_grad():
        ref_val = theirs.compute_loss(theirs.model, dict(batch))
        our_val = ours.compute_loss(ours.model, dict(batch))
    torch.testing.assert_close(our_val.float(), ref_val.float(), rtol=1e-4, atol=1e-5)
    # the check can fail: DPO at h = 0 would be ln 2, hinge 1, IPO 1/(4 beta^2); these batches are away from it
    assert abs(ref_val.item() - {"sigmoid": 0.6931, "hinge": 1.0, "ipo": 1 / (4 * 0.09), "robust": 0.6931}[loss_type]) > 1e-3


def test_tiny_trainer_run_with_weights_and_madpo(tmp_path):
    loss = losskit.get("madpo", beta=0.3)
    t0 = time.perf_counter()
    tr = make(LosskitDPOTrainer, tmp_path, losskit_loss=loss)
    batch = first_batch(tr)
    assert "sample_weight" in batch and "reward_margin" in batch
    before = [p.detach().clone() for p in tr.model.parameters()]
    tr.train()
    assert time.perf_counter() - t0 < 60
    changed = sum(int(not torch.equal(a, b.detach())) for a, b in zip(before, tr.model.parameters()))
    assert changed > 0
    # the per-sample weight column reaches the loss: weight 0 removes a pair's contribution
    with torch.no_grad():
        w0 = dict(batch)
        w0["sample_weight"] = torch.zeros_like(batch["sample_weight"])
        assert tr.compute_loss(tr.model, w0).item() == 0.0


def test_precomputed_reference_logps_match_our_logps(tmp_path):
    # TRL precomputes reference log-probs with its fused LM head from the initial model; our
    # sequence_logps of the same (untrained) policy must agree (to float32 summation differences,
    # about 1e-4 nats), so DPO starts at ln 2; a wrong token shift or mask would be off by O(1)
    import math

    tok = tiny_tokenizer()
    args = trl.DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=1, report_to="none",
                         save_strategy="no", beta=0.3, use_cpu=True, seed=0, precompute_ref_log_probs=True)
    tr = LosskitDPOTrainer(model=tiny_model(len(tok)), args=args, train_dataset=tiny_dataset(),
                           processing_class=tok, losskit_loss=losskit.get("dpo", beta=0.3))
    batch = first_batch(tr)
    assert "ref_chosen_logps" in batch and "reward_margin" in batch  # dpo simply does not receive reward_margin
    with torch.no_grad():
        unweighted = dict(batch)
        unweighted["sample_weight"] = torch.ones_like(batch["sample_weight"])
        assert tr.compute_loss(tr.model, unweighted).item() == pytest.approx(math.log(2), abs=2e-4)
        w = batch["sample_weight"]
        assert tr.compute_loss(tr.model, dict(batch)).item() == pytest.approx(math.log(2) * float(w.mean()), abs=2e-4)
