"""convert() on Hugging Face models (issue #26, item 1): tiny GPT-2, BERT and ViT built from local
configs (no download). After convert(strict=True) only scores train, every Conv1D / Linear /
Embedding weight is masked or frozen as the ``embeddings`` option says, outputs equal a plain copy
whose weights are ``weight * mask``, every scores tensor gets a gradient, GPT-2 still generates."""
from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn as nn
from torch.nn.utils import parametrize

transformers = pytest.importorskip("transformers", reason="transformers is an optional extra (pip install '.[hf]')")
from transformers.pytorch_utils import Conv1D  # noqa: E402

import supermask as sm  # noqa: E402
from supermask.convert import ConvertError  # noqa: E402
from supermask.layers import SupermaskMixin  # noqa: E402
from supermask.mask import num_kept  # noqa: E402
from supermask.parametrize import SupermaskParametrization  # noqa: E402

warnings.filterwarnings("ignore", message=".*token_id must be.*")


def tiny_gpt2():
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=100, n_positions=32,
                                  bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)


def tiny_bert():
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=32, num_labels=3)
    return transformers.BertForSequenceClassification(cfg)


def tiny_vit():
    cfg = transformers.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=64, num_labels=5)
    return transformers.ViTForImageClassification(cfg)


def tokens(gen):
    return {"input_ids": torch.randint(1, 100, (2, 12), generator=gen)}


def pixels(gen):
    return {"pixel_values": torch.randn(2, 3, 16, 16, generator=gen)}


FAMILIES = {"gpt2": (tiny_gpt2, tokens), "bert": (tiny_bert, tokens), "vit": (tiny_vit, pixels)}


def sm_mask_of(module: nn.Module, name: str = "weight") -> SupermaskMixin | None:
    """The supermask deciding module.<name>: the fused layer itself or its parametrization; None if unmasked."""
    if isinstance(module, SupermaskMixin):
        return module
    if parametrize.is_parametrized(module, name):
        p = module.parametrizations[name][0]
        return p if isinstance(p, SupermaskParametrization) else None
    return None


def plain_copy(original: nn.Module, converted: nn.Module, report) -> nn.Module:
    """A deep copy of the unconverted model where each masked weight is replaced by weight * mask,
    each removed or zeroed bias by 0 and each normalisation made an identity affine map (scale 1, shift 0)."""
    ref = copy.deepcopy(original)
    params = dict(ref.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for name in report.masked:
            mod_name, _, pname = name.rpartition(".")
            layer = sm_mask_of(converted.get_submodule(mod_name), pname)
            mask = layer.mask()
            assert set(mask.unique().tolist()) <= {0.0, 1.0}
            assert int(mask.sum()) == num_kept(mask.numel(), layer.k)
            params[name].copy_(layer.weight * mask)
        for name in report.removed + report.zeroed:
            params[name].zero_()
        for name in report.non_affine:
            params[name].fill_(1.0 if name.endswith("weight") else 0.0)
    return ref


def convert_family(family: str, embeddings: str | None):
    build, inputs = FAMILIES[family]
    torch.manual_seed(0)
    original = build().eval()
    kw = {} if family == "vit" else {"embeddings": embeddings}
    model, report = sm.convert(original, k=0.4, strict=True, return_report=True, **kw)
    return original, model.eval(), report, inputs(torch.Generator().manual_seed(1))


def logits(model, x):
    return model(**x).logits


CASES = [("gpt2", "mask"), ("gpt2", "freeze"), ("bert", "mask"), ("bert", "freeze"), ("vit", None)]


@pytest.mark.parametrize("family, embeddings", CASES)
def test_converted_model_equals_plain_copy_with_masked_weights(family, embeddings):
    original, model, report, x = convert_family(family, embeddings)
    ref = plain_copy(original, model, report).eval()
    with torch.no_grad():
        torch.testing.assert_close(logits(model, x), logits(ref, x), rtol=1e-5, atol=1e-5)
    assert not report.unhandled


@pytest.mark.parametrize("family, embeddings", CASES)
def test_only_scores_train_and_every_layer_weight_masked_or_frozen(family, embeddings):
    _, model, _, _ = convert_family(family, embeddings)
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all(n.endswith("scores") for n in trained)
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, Conv1D)):
            assert sm_mask_of(m) is not None, name
        elif isinstance(m, nn.Embedding):
            if embeddings == "mask":
                assert sm_mask_of(m) is not None, name
            elif parametrize.is_parametrized(m, "weight"):  # freeze: only a weight tied to a masked one
                assert name == "transformer.wte" and sm_mask_of(m) is sm_mask_of(model.lm_head), name
            else:
                assert not m.weight.requires_grad, name
    if family == "gpt2":  # lm_head tied to wte: one parametrization, one scores tensor
        lm, wte = model.lm_head, model.transformer.wte
        assert sm_mask_of(lm) is sm_mask_of(wte)
        assert lm.parametrizations.weight.original is wte.parametrizations.weight.original
        assert sum(n.startswith("lm_head") for n in trained) == 0


@pytest.mark.parametrize("family, embeddings", CASES)
def test_every_scores_tensor_gets_a_gradient(family, embeddings):
    _, model, _, x = convert_family(family, embeddings)
    logits(model.train(), x).square().mean().backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_gpt2_still_generates_and_greedy_agrees_with_the_plain_copy():
    original, model, report, x = convert_family("gpt2", "mask")
    ref = plain_copy(original, model, report).eval()
    prompt = x["input_ids"][:1, :4]
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        out = model.generate(prompt, **kw)
        assert out.shape == (1, 8)
        assert torch.equal(out, ref.generate(prompt, **kw))


def test_conv1d_is_masked_as_the_linear_it_stands_for():
    """Conv1D(nf=6, nx=4) stores its weight (in=4, out=6): it gets the weights and scores of an
    nn.Linear(4, 6) of the same name and seed, transposed; fan_in is 4, so with signed_constant
    every weight is +-sqrt(2) / sqrt(4) (Kaiming, ReLU gain), worked out by hand."""
    conv = sm.convert(nn.Sequential(Conv1D(6, 4)), k=0.5, seed=3, strict=True)
    lin = sm.convert(nn.Sequential(nn.Linear(4, 6)), k=0.5, seed=3, strict=True)
    p = sm_mask_of(conv[0])
    assert p.weight.shape == (4, 6)
    torch.testing.assert_close(p.weight, lin[0].weight.T, rtol=0, atol=0)
    torch.testing.assert_close(p.scores, lin[0].scores.T, rtol=0, atol=0)
    assert torch.all(p.weight.abs() == math.sqrt(2) / 2)
    x = torch.randn(3, 4)
    torch.testing.assert_close(conv(x), lin(x), rtol=1e-6, atol=1e-6)
    assert not conv[0].bias.requires_grad and torch.all(conv[0].bias == 0)  # addmm needs a tensor: kept, zero


@pytest.mark.parametrize("embeddings, error, match", [
    (None, ConvertError, r"transformer\.wpe\.weight \(Embedding\)"),  # no choice made: strict refuses
    ("train", ValueError, "embeddings must be one of"),
    (True, ValueError, "embeddings must be one of"),
])
def test_embeddings_option_bad_values(embeddings, error, match):
    model = tiny_gpt2()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=match):
        sm.convert(model, strict=True, inplace=True, embeddings=embeddings)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
