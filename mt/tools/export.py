"""Export a trained run to CTranslate2, for serving from C++ or Python with its runtime.

The model is rebuilt as CTranslate2's own pre-norm transformer spec: fused self-attention QKV, fused
cross-attention KV, our sinusoid table as the position table, LayerNorm epsilon 1e-5, tied or untied
embeddings. Tokens are the run's SentencePiece pieces (ids 0-3 named <pad> <unk> <s> </s>).
An encoder-decoder serves with ctranslate2.Translator: encode the source with OUT/spm.model, append
"</s>". A decoder-only LM serves with ctranslate2.Generator from the prompt "<s>" + pieces; a prefix LM
from pieces(x) + "</s>" "<s>" (how mt.models.DecoderLM reads x EOS BOS y).
Needs the optional `ctranslate2` package (pip install "mt[ctranslate2]").
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from mt.checkpoint import load_run
from mt.errors import MTError

SPECIALS = ("<pad>", "<unk>", "<s>", "</s>")  # mt's pinned ids 0-3 (mt.tokenizer)


def _numpy(t):
    return t.detach().float().cpu().numpy()


def _linear(spec, module) -> None:
    spec.weight = _numpy(module.weight)
    if module.bias is not None:
        spec.bias = _numpy(module.bias)


def _norm(spec, module) -> None:
    spec.gamma, spec.beta = _numpy(module.weight), _numpy(module.bias)


def _self_attention_layer(layer, ours) -> None:
    """A pre-norm self-attention + feed-forward layer (mt's EncoderLayer) into CT2's layer spec."""
    _norm(layer.self_attention.layer_norm, ours.norm1)
    _linear(layer.self_attention.linear[0], ours.attn.qkv)  # rows: queries, keys, values (CT2's order)
    _linear(layer.self_attention.linear[1], ours.attn.out)
    _norm(layer.ffn.layer_norm, ours.norm2)
    _linear(layer.ffn.linear_0, ours.ffn.up)
    _linear(layer.ffn.linear_1, ours.ffn.down)


def build_spec(model, pieces: list[str]):
    """A ctranslate2 model spec holding `model`'s weights: a TransformerSpec for an encoder-decoder,
    a TransformerDecoderModelSpec (served by ctranslate2.Generator) for a decoder-only or prefix LM."""
    try:
        from ctranslate2.specs import transformer_spec
    except ImportError:
        raise MTError('exporting to CTranslate2 needs the ctranslate2 package: pip install "mt[ctranslate2]"') from None
    from mt.models import DecoderLM, Transformer

    cfg = model.cfg
    if not isinstance(model, (DecoderLM, Transformer)) or model.parallel_decoding:
        raise MTError(f"model.arch {cfg.arch} ({type(model).__name__}) has no CTranslate2 counterpart; "
                      "transformer, decoder_only and prefix_lm runs export")
    if cfg.mixer != "softmax" or cfg.positions != "sinusoidal":
        raise MTError(f"model.mixer {cfg.mixer} with model.positions {cfg.positions} does not export to CTranslate2; "
                      "full (softmax) attention with sinusoidal positions does")
    positions = _numpy(model.positions)
    vocab = list(SPECIALS) + pieces[len(SPECIALS):]
    if isinstance(model, DecoderLM):
        spec = transformer_spec.TransformerDecoderModelSpec.from_config(cfg.dec_layers, cfg.heads, pre_norm=True)
        spec.config.layer_norm_epsilon = model.norm.eps
        spec.config.bos_token, spec.config.eos_token, spec.config.unk_token = "<s>", "</s>", "<unk>"
        dec = spec.decoder
        dec.embeddings.weight = _numpy(model.embed.weight)
        dec.position_encodings.encodings = positions
        dec.projection.weight = _numpy(model.output.weight)
        _norm(dec.layer_norm, model.norm)
        for layer, ours in zip(dec.layer, model.layers):
            _self_attention_layer(layer, ours)
        spec.register_vocabulary(vocab)
        return spec
    spec = transformer_spec.TransformerSpec.from_config((cfg.enc_layers, cfg.dec_layers), cfg.heads, pre_norm=True)
    spec.config.layer_norm_epsilon = model.enc_norm.eps
    spec.encoder.embeddings[0].weight = _numpy(model.embed.weight)
    spec.encoder.position_encodings.encodings = positions
    spec.decoder.embeddings.weight = _numpy(model.tgt_embed.weight)
    spec.decoder.position_encodings.encodings = positions
    spec.decoder.projection.weight = _numpy(model.output.weight)
    _norm(spec.encoder.layer_norm, model.enc_norm)
    _norm(spec.decoder.layer_norm, model.dec_norm)
    for layer, ours in zip(spec.encoder.layer, model.encoder):
        _self_attention_layer(layer, ours)
    for layer, ours in zip(spec.decoder.layer, model.decoder):
        _norm(layer.self_attention.layer_norm, ours.norm1)
        _linear(layer.self_attention.linear[0], ours.self_attn.qkv)
        _linear(layer.self_attention.linear[1], ours.self_attn.out)
        _norm(layer.attention.layer_norm, ours.norm2)
        _linear(layer.attention.linear[0], ours.cross_attn.q)
        _linear(layer.attention.linear[1], ours.cross_attn.kv)  # rows: keys, values
        _linear(layer.attention.linear[2], ours.cross_attn.out)
        _norm(layer.ffn.layer_norm, ours.norm3)
        _linear(layer.ffn.linear_0, ours.ffn.up)
        _linear(layer.ffn.linear_1, ours.ffn.down)
    spec.register_source_vocabulary(vocab)
    spec.register_target_vocabulary(vocab)
    spec.config.decoder_start_token = "<s>"
    return spec


def export_ctranslate2(run: str | Path, out: str | Path, *, weights: str = "model",
                       quantization: str | None = None, overwrite: bool = False) -> Path:
    """Write RUN as a CTranslate2 model directory OUT (with spm.model and mt_export.json beside it).
    An existing non-empty OUT is refused, or replaced with overwrite=True when it is an earlier export
    (it holds mt_export.json); the new model is written beside it under a temporary name of this
    process's own and renamed into place, so OUT is never half-written."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise MTError(f"{out}: exists and is not empty (--overwrite replaces an earlier export)")
        if not (out / "mt_export.json").is_file():
            raise MTError(f"{out}: exists and is not an mt export (no mt_export.json): not replaced")
    cfg, model, tok = load_run(run, weights=weights)
    sp = tok.sp
    try:
        spec = build_spec(model, [sp.id_to_piece(i) for i in range(sp.get_piece_size())])
    except MTError as e:
        raise MTError(f"{run}: {e}") from None
    spec.validate()
    spec.optimize(quantization=quantization)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))  # ours alone
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # the mode a plain mkdir would give OUT
        _write(spec, tmp, run, cfg, weights, quantization)
        if out.exists():  # an earlier export (checked above): moved aside, then removed
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.replace(out, old / "model")
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _write(spec, tmp: Path, run, cfg, weights: str, quantization) -> None:
    spec.save(str(tmp))
    shutil.copy(Path(run) / "spm.model", tmp / "spm.model")
    dc = cfg.decode
    (tmp / "mt_export.json").write_text(json.dumps({
        "source": str(run), "arch": cfg.model.arch, "weights": weights, "quantization": quantization,
        "src_lang": cfg.data.src_lang, "tgt_lang": cfg.data.tgt_lang, "lowercase": cfg.data.lowercase,
        "beam_size": dc.beam_size, "length_penalty": dc.length_penalty,
        "max_len_a": dc.max_len_a, "max_len_b": dc.max_len_b}, indent=2) + "\n", encoding="utf-8")
