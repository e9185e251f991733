"""A pure-PyTorch encoder-decoder that computes what the trained megatron-core model computes, at inference.

Why it exists: an exported model (`checkpoint_tools/export.py`) must run where megatron-core, process groups and
the trainer are absent, and a second, plain implementation documents the architecture in one file. It imports
torch, safetensors and two pure modules of this package (`model/routing.py`'s top-k and capacity maths, so token
dropping cannot drift from the trainer's; nothing here imports megatron, and a test checks it).

What it reproduces of `model/encdec.py` (eval mode, no dropout):
  * embeddings: word embedding times `embedding_scale` (sqrt(d) or 1) + learned absolute position (positions
    0..n-1 on each side), one table for source and target, and the word embedding (its first V rows) is the
    output projection;
  * pre-norm layers: x + SelfAttn(N(x)); [decoder: x + CrossAttn(N(x), encoder)]; x + FFN(N(x)); a final norm per
    side. N is LayerNorm or RMSNorm with the configured epsilon;
  * attention: torch SDPA with scale 1/sqrt(head dim), padding keys masked, causal in decoder self-attention, and a
    query whose keys are all masked attends everywhere (it belongs to padding) instead of producing NaN;
  * FFN: relu / gelu (exact) / swiglu (first half of fc1 through silu times the second half);
  * MoE FFN: router logits by mode (token; sentence = the masked mean of the sentence in the encoder, of the
    source sentence's encoder output in the decoder; task = task table through the gate; task_token = gate over
    concat(token, task embedding)), softmax top-k (renormalized over the k or raw),
    optional capacity with token dropping over the whole batch in megatron's s-major token order, experts as FFNs,
    output = sum_k p_k * expert_k(x); then task adapters (static / dynamic / shared-dynamic) on the MoE output.

Decoding is incremental (`start_decoding`, `decode_next`, `reorder`; `ReferenceDecoder` drives them for
`generation.beam_search`): each decoder layer keeps its self-attention keys/values [N, H, t, Dh] (concatenated
step by step, gathered on beam reordering) and the keys/values of the encoder output [L, H, S, Dh], computed at the
first step; the K hypotheses of a sentence are consecutive rows and attend to its one copy as K queries; logits
are computed for the new position only. `decode_step` re-runs the decoder on whole prefixes (the full-recompute
reference the tests compare with).

Layout: activations are [S, B, D] inside (megatron's), tokens [B, S] at the API. Legend: B batch, S source length,
T target length (or tokens when flattened s-major: t = s*B + b), D model dim, H heads, Dh head dim, F FFN dim,
V vocabulary, E experts, K top-k (in decoding: hypotheses per sentence), G task-table rows, C task embedding dim,
A adapters, N hypotheses, L live sentences, t cached positions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from megatron_taskmoe.model import routing as R
from megatron_taskmoe.reference.config import ArchConfig, MoESpec


@dataclass
class Ids:
    """Per-sentence ids [B] that task routing and adapters read."""

    task_B: Optional[torch.Tensor] = None
    """Task id of each sentence, or None."""
    tgt_lang_B: Optional[torch.Tensor] = None
    """Target language id of each sentence, or None."""

    def get(self, source: str) -> torch.Tensor:
        ids = self.task_B if source == "task" else self.tgt_lang_B
        if ids is None:
            raise ValueError(f"this model routes by {source} ids: pass them (task_ids / tgt_lang_ids)")
        return ids

    def select(self, index_N: torch.Tensor) -> "Ids":
        pick = (lambda x: None if x is None else x.index_select(0, index_N))
        return Ids(pick(self.task_B), pick(self.tgt_lang_B))


def masked_mean(x_SBD: torch.Tensor, padding_SB: torch.Tensor) -> torch.Tensor:
    """Each sequence's mean over its real positions, [B, D] (zero for an all-padding sequence)."""
    valid_SB1 = (~padding_SB).unsqueeze(-1).to(x_SBD.dtype)
    return (x_SBD * valid_SB1).sum(dim=0) / valid_SB1.sum(dim=(0, 2)).clamp(min=1).unsqueeze(-1)


def token_ids(ids_B: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Per-sentence ids repeated to every token in s-major order: [B] -> [S*B]."""
    return ids_B.unsqueeze(0).expand(seq_len, -1).reshape(-1)


class Norm(nn.Module):
    def __init__(self, kind: str, dim: int, eps: float):
        super().__init__()
        self.kind, self.eps, self.dim = kind, eps, dim
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if kind == "LayerNorm" else None

    def forward(self, x_D: torch.Tensor) -> torch.Tensor:
        if self.kind == "LayerNorm":
            return F.layer_norm(x_D, (self.dim,), self.weight, self.bias, self.eps)
        return F.rms_norm(x_D, (self.dim,), self.weight, self.eps)


def allowed_mask(key_padding_BK: torch.Tensor, causal: bool, sq: int) -> torch.Tensor:
    """[B, 1, Sq, Sk] True where attention is allowed; a query row with nothing allowed is opened entirely."""
    sk = key_padding_BK.shape[1]
    allowed = ~key_padding_BK[:, None, None, :]
    if causal:
        allowed = allowed & torch.ones(sq, sk, dtype=torch.bool, device=allowed.device).tril(diagonal=sk - sq)
    return allowed | ~allowed.any(dim=-1, keepdim=True)


class Attention(nn.Module):
    """Multi-head attention; q/k/v/out projections (biases only when the model has them)."""

    def __init__(self, dim: int, heads: int, bias: bool):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(dim, dim, bias=bias) for _ in range(4))

    def _split(self, x_SBD: torch.Tensor) -> torch.Tensor:
        s, b, _ = x_SBD.shape
        return x_SBD.view(s, b, self.heads, self.head_dim).permute(1, 2, 0, 3)  # [B, H, S, Dh]

    def forward(self, x_QBD: torch.Tensor, kv_KBD: torch.Tensor, key_padding_BK: torch.Tensor,
                causal: bool) -> torch.Tensor:
        sq, b, d = x_QBD.shape
        q, k, v = self._split(self.q_proj(x_QBD)), self._split(self.k_proj(kv_KBD)), self._split(self.v_proj(kv_KBD))
        mask = allowed_mask(key_padding_BK, causal, sq)
        ctx_BHQD = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0 / math.sqrt(self.head_dim))
        return self.out_proj(ctx_BHQD.permute(2, 0, 1, 3).reshape(sq, b, d))

    def step_self(self, x_1ND: torch.Tensor, cached: Optional[tuple]) -> tuple[torch.Tensor, tuple]:
        """One decoding step of self-attention: the new position attends to the cached ones and itself. Returns
        the output [1, N, D] and the keys/values [N, H, t+1, Dh] to cache."""
        _, n, d = x_1ND.shape
        k, v = self._split(self.k_proj(x_1ND)), self._split(self.v_proj(x_1ND))
        if cached is not None:
            k, v = torch.cat([cached[0], k], dim=2), torch.cat([cached[1], v], dim=2)
        ctx_NH1D = F.scaled_dot_product_attention(self._split(self.q_proj(x_1ND)), k, v,
                                                  scale=1.0 / math.sqrt(self.head_dim))
        return self.out_proj(ctx_NH1D.permute(2, 0, 1, 3).reshape(1, n, d)), (k, v)

    def memory_keys_values(self, memory_SBD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [B, H, S, Dh] of the encoder output, for every decoding step of a batch."""
        return self._split(self.k_proj(memory_SBD)), self._split(self.v_proj(memory_SBD))

    def step_cross(self, x_1ND: torch.Tensor, kv: tuple, memory_padding_LS: torch.Tensor) -> torch.Tensor:
        """One decoding step of cross-attention: the K hypotheses of each of the L sentences (consecutive rows)
        query its encoder keys/values [L, H, S, Dh] together."""
        _, n, d = x_1ND.shape
        rows = memory_padding_LS.shape[0]
        beams = n // rows
        q_NH1D = self._split(self.q_proj(x_1ND))
        q_LHKD = q_NH1D.view(rows, beams, self.heads, self.head_dim).transpose(1, 2)
        mask = allowed_mask(memory_padding_LS, False, beams)
        ctx_LHKD = F.scaled_dot_product_attention(q_LHKD, kv[0], kv[1], attn_mask=mask,
                                                  scale=1.0 / math.sqrt(self.head_dim))
        return self.out_proj(ctx_LHKD.transpose(1, 2).reshape(1, n, d))


def activate(h_F: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "swiglu":
        gate, linear = torch.chunk(h_F, 2, dim=-1)
        return F.silu(gate) * linear
    return F.gelu(h_F) if activation == "gelu" else F.relu(h_F)


class FFN(nn.Module):
    """Dense FFN: fc2(act(fc1(x))); swiglu's fc1 has 2F rows (gate half first)."""

    def __init__(self, dim: int, hidden: int, activation: str, bias: bool):
        super().__init__()
        self.activation = activation
        self.fc1 = nn.Linear(dim, hidden * (2 if activation == "swiglu" else 1), bias=bias)
        self.fc2 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x_SBD: torch.Tensor, padding_SB: torch.Tensor, ids: Ids,
                memory_mean_BD: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.fc2(activate(self.fc1(x_SBD), self.activation))


class Router(nn.Module):
    """Router logits [T, E] by mode (see `RoutingSpec`); weight [E, D], [E, C] (task) or [E, D + C] (task_token)."""

    def __init__(self, moe: MoESpec, side: str, dim: int):
        super().__init__()
        spec = moe.side(side)
        self.mode, self.task_source, self.fp32 = spec.mode, spec.task_source, moe.router_fp32
        experts = spec.num_experts
        gate_in = {"token": dim, "sentence": dim, "task": spec.task_embed_dim,
                   "task_token": dim + spec.task_embed_dim}[spec.mode]
        self.weight = nn.Parameter(torch.empty(experts, gate_in))
        self.task_embedding = (nn.Parameter(torch.empty(moe.num_task_rows(spec.task_source), spec.task_embed_dim))
                               if spec.mode in ("task", "task_token") else None)

    def forward(self, x_SBD: torch.Tensor, padding_SB: torch.Tensor, ids: Ids,
                memory_mean_BD: Optional[torch.Tensor] = None) -> torch.Tensor:
        s, b, d = x_SBD.shape
        dtype = torch.float32 if self.fp32 else x_SBD.dtype
        weight = self.weight.to(dtype)
        if self.mode == "token":
            return F.linear(x_SBD.reshape(-1, d).to(dtype), weight)
        if self.mode == "sentence":
            # The decoder routes by its source sentence (the encoder output's mean), the encoder by its own input.
            mean_BD = memory_mean_BD if memory_mean_BD is not None else masked_mean(x_SBD, padding_SB)
            return F.linear(mean_BD.to(dtype), weight).unsqueeze(0).expand(s, -1, -1).reshape(s * b, -1)
        ids_T = token_ids(ids.get(self.task_source), s)
        if self.mode == "task":
            return F.linear(self.task_embedding.to(dtype), weight).index_select(0, ids_T)
        task_TC = self.task_embedding.index_select(0, ids_T).to(dtype)
        return F.linear(torch.cat([x_SBD.reshape(-1, d).to(dtype), task_TC], dim=-1), weight)


class Experts(nn.Module):
    """E FFNs without biases, stacked: fc1_weight [E, F (2F for swiglu), D], fc2_weight [E, D, F]."""

    def __init__(self, experts: int, dim: int, hidden: int, activation: str):
        super().__init__()
        self.activation = activation
        self.fc1_weight = nn.Parameter(torch.empty(experts, hidden * (2 if activation == "swiglu" else 1), dim))
        self.fc2_weight = nn.Parameter(torch.empty(experts, dim, hidden))

    def expert(self, e: int, x_ND: torch.Tensor) -> torch.Tensor:
        return F.linear(activate(F.linear(x_ND, self.fc1_weight[e]), self.activation), self.fc2_weight[e])


class Adapters(nn.Module):
    """Task adapters on the MoE output: h + sum over chosen a of w_a * up_a(relu(down_a(LN_a(h)))).

    static: the token's task row's adapter, weight 1. dynamic / shared_dynamic: a gate over concat(h, task
    embedding) [A, D + C], softmax, top-k adapters weighted by their probability; shared_dynamic reads the task
    table of the same layer's router."""

    def __init__(self, moe: MoESpec, dim: int, eps: float):
        super().__init__()
        spec = moe.adapters
        self.mode, self.task_source, self.topk, self.eps = spec.mode, spec.task_source, spec.topk, eps
        a, h = spec.num_adapters, spec.hidden_size
        self.norm_weight, self.norm_bias = nn.Parameter(torch.ones(a, dim)), nn.Parameter(torch.zeros(a, dim))
        self.down_weight, self.down_bias = nn.Parameter(torch.empty(a, dim, h)), nn.Parameter(torch.zeros(a, h))
        self.up_weight, self.up_bias = nn.Parameter(torch.empty(a, h, dim)), nn.Parameter(torch.zeros(a, dim))
        dynamic = spec.mode in ("dynamic", "shared_dynamic")
        self.gate_weight = nn.Parameter(torch.empty(a, dim + spec.task_embed_dim)) if dynamic else None
        self.task_embedding = (nn.Parameter(torch.empty(moe.num_task_rows(spec.task_source), spec.task_embed_dim))
                               if spec.mode == "dynamic" else None)

    def forward(self, h_TD: torch.Tensor, ids_T: torch.Tensor, shared_table_GC: Optional[torch.Tensor]):
        num = self.norm_weight.shape[0]
        if self.mode == "static":
            map_TA = F.one_hot(ids_T, num).bool()
            weights_TA = map_TA.to(h_TD.dtype)
        else:
            table = shared_table_GC if self.mode == "shared_dynamic" else self.task_embedding
            gate_in = torch.cat([h_TD, table.index_select(0, ids_T).to(h_TD.dtype)], dim=-1)
            probs_TA = torch.softmax(F.linear(gate_in, self.gate_weight.to(h_TD.dtype)), dim=-1,
                                     dtype=torch.float32).to(h_TD.dtype)
            top_p_TK, top_i_TK = torch.topk(probs_TA, k=self.topk, dim=-1)
            weights_TA = torch.zeros_like(probs_TA).scatter(-1, top_i_TK, top_p_TK)
            map_TA = torch.zeros_like(probs_TA, dtype=torch.bool).scatter(-1, top_i_TK, True)
        out_TD = h_TD
        for a in range(num):
            idx_N = map_TA[:, a].nonzero().squeeze(-1)
            if idx_N.numel() == 0:
                continue
            x_ND = F.layer_norm(h_TD.index_select(0, idx_N), (h_TD.shape[-1],), self.norm_weight[a],
                                self.norm_bias[a], self.eps)
            delta_ND = F.relu(x_ND @ self.down_weight[a] + self.down_bias[a]) @ self.up_weight[a] + self.up_bias[a]
            out_TD = out_TD.index_add(0, idx_N, delta_ND * weights_TA.index_select(0, idx_N)[:, a : a + 1])
        return out_TD


class MoEFFN(nn.Module):
    """Router -> top-k (-> capacity) -> experts -> weighted sum -> adapters."""

    def __init__(self, arch: ArchConfig, side: str):
        super().__init__()
        moe = arch.moe
        self.spec = moe
        self.capacity_num_experts = moe.side(side).capacity_num_experts
        self.router = Router(moe, side, arch.hidden_size)
        self.experts = Experts(moe.side(side).num_experts, arch.hidden_size, moe.expert_ffn_hidden_size,
                               arch.activation)
        self.adapters = Adapters(moe, arch.hidden_size, arch.layernorm_epsilon) if moe.adapters.mode != "none" else None

    def forward(self, x_SBD: torch.Tensor, padding_SB: torch.Tensor, ids: Ids,
                memory_mean_BD: Optional[torch.Tensor] = None) -> torch.Tensor:
        s, b, d = x_SBD.shape
        spec = self.spec
        logits_TE = self.router(x_SBD, padding_SB, ids, memory_mean_BD)
        probs_TE, map_TE = R.topk_routing(logits_TE, spec.topk, renormalize=spec.renormalize)
        if spec.capacity_factor is not None:
            capacity = R.expert_capacity(logits_TE.shape[0], self.capacity_num_experts or logits_TE.shape[1],
                                         spec.topk, spec.capacity_factor)
            probs_TE, map_TE = R.drop_over_capacity(probs_TE, map_TE, capacity, drop_policy=spec.drop_policy,
                                                    pad_to_capacity=spec.pad_to_capacity,
                                                    valid_T=~padding_SB.reshape(-1))
        x_TD = x_SBD.reshape(-1, d)
        out_TD = torch.zeros_like(x_TD)
        for e in range(map_TE.shape[1]):
            idx_N = map_TE[:, e].nonzero().squeeze(-1)
            if idx_N.numel():
                y_ND = self.experts.expert(e, x_TD.index_select(0, idx_N))
                out_TD.index_add_(0, idx_N, y_ND * probs_TE[idx_N, e].unsqueeze(-1).to(y_ND.dtype))
        if self.adapters is not None:
            ids_T = token_ids(ids.get(spec.adapters.task_source), s)
            out_TD = self.adapters(out_TD, ids_T, self.router.task_embedding)
        return out_TD.view(s, b, d)


class Layer(nn.Module):
    def __init__(self, arch: ArchConfig, side: str, moe: bool):
        super().__init__()
        norm = (lambda: Norm(arch.normalization, arch.hidden_size, arch.layernorm_epsilon))
        self.decoder = side == "decoder"
        self.self_attn_norm = norm()
        self.self_attn = Attention(arch.hidden_size, arch.num_attention_heads, arch.bias)
        if self.decoder:
            self.cross_attn_norm = norm()
            self.cross_attn = Attention(arch.hidden_size, arch.num_attention_heads, arch.bias)
        self.ffn_norm = norm()
        self.ffn = (MoEFFN(arch, side) if moe
                    else FFN(arch.hidden_size, arch.ffn_hidden_size, arch.activation, arch.bias))

    def forward(self, x_SBD, padding_SB, ids: Ids, memory_KBD=None, memory_padding_BK=None, memory_mean_BD=None):
        h_SBD = self.self_attn_norm(x_SBD)
        x_SBD = x_SBD + self.self_attn(h_SBD, h_SBD, padding_SB.t(), causal=self.decoder)
        if self.decoder:
            h_SBD = self.cross_attn_norm(x_SBD)
            x_SBD = x_SBD + self.cross_attn(h_SBD, memory_KBD, memory_padding_BK, causal=False)
        return x_SBD + self.ffn(self.ffn_norm(x_SBD), padding_SB, ids, memory_mean_BD)

    def step(self, x_1ND: torch.Tensor, ids: Ids, state: "DecodingState", index: int, memory_SBD: torch.Tensor,
             memory_mean_ND: torch.Tensor):
        """One decoding step of decoder layer `index` on the rows' new positions [1, N, D] (`memory_mean_ND`: each
        row's source sentence representation, for sentence routing)."""
        out_1ND, state.self_kv[index] = self.self_attn.step_self(self.self_attn_norm(x_1ND), state.self_kv.get(index))
        x_1ND = x_1ND + out_1ND
        if index not in state.cross_kv:
            state.cross_kv[index] = self.cross_attn.memory_keys_values(memory_SBD)
        x_1ND = x_1ND + self.cross_attn.step_cross(self.cross_attn_norm(x_1ND), state.cross_kv[index],
                                                   state.memory_padding_LS)
        padding_1N = torch.zeros(x_1ND.shape[:2], dtype=torch.bool, device=x_1ND.device)
        return x_1ND + self.ffn(self.ffn_norm(x_1ND), padding_1N, ids, memory_mean_ND)


class Stack(nn.Module):
    def __init__(self, arch: ArchConfig, side: str):
        super().__init__()
        num = arch.encoder_layers if side == "encoder" else arch.decoder_layers
        moe_layers = set(arch.moe_layers(side))
        self.layers = nn.ModuleList(Layer(arch, side, i in moe_layers) for i in range(num))
        self.final_norm = Norm(arch.normalization, arch.hidden_size, arch.layernorm_epsilon)

    def forward(self, x_SBD, padding_SB, ids: Ids, memory_KBD=None, memory_padding_BK=None):
        memory_mean_BD = None if memory_KBD is None else masked_mean(memory_KBD, memory_padding_BK.t())
        for layer in self.layers:
            x_SBD = layer(x_SBD, padding_SB, ids, memory_KBD, memory_padding_BK, memory_mean_BD)
        return self.final_norm(x_SBD)


@dataclass
class DecodingState:
    """Incremental decoding of an encoded batch (see the module docstring); rows are sentence-major, `beam_size`
    per live sentence."""

    beam_size: int
    """Rows per live sentence."""
    sources_L: torch.Tensor
    """Batch index of each live sentence."""
    memory_padding_LS: torch.Tensor
    """Source padding (True) of each live sentence."""
    memory_mean_BD: torch.Tensor
    """Each source sentence's mean encoder output (the decoder's sentence routing state)."""
    length: int = 0
    """Target tokens decoded so far."""
    self_kv: dict = field(default_factory=dict)
    """Decoder layer index -> its self-attention keys and values so far."""
    cross_kv: dict = field(default_factory=dict)
    """Decoder layer index -> its cross-attention keys and values of the encoder output."""


@dataclass
class EncoderOutput:
    """What decoding needs per source sentence b."""

    memory_SBD: torch.Tensor
    """The encoder output."""
    padding_BS: torch.Tensor
    """True at source padding."""
    ids: Ids
    """The sentences' task and target language ids."""


class ReferenceModel(nn.Module):
    """The exported encoder-decoder; `forward` gives logits [B, T, V], `encode` + `decode_step` decode."""

    def __init__(self, arch: ArchConfig):
        super().__init__()
        self.arch = arch
        self.embed_tokens = nn.Embedding(arch.vocab_size, arch.hidden_size)
        self.embed_positions = nn.Embedding(arch.max_positions, arch.hidden_size)
        self.encoder = Stack(arch, "encoder")
        self.decoder = Stack(arch, "decoder")

    def embed(self, tokens_BX: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Scaled word + position embeddings, [X, B, D], at positions start.."""
        length = start + tokens_BX.shape[1]
        if length > self.arch.max_positions:
            raise ValueError(f"sequence of {length} tokens exceeds the {self.arch.max_positions} learned positions")
        positions = torch.arange(start, length, device=tokens_BX.device)
        tokens_BXD = self.embed_tokens(tokens_BX) * self.arch.embedding_scale
        return (tokens_BXD + self.embed_positions(positions)[None]).transpose(0, 1).contiguous()

    @torch.no_grad()
    def encode(self, src_tokens_BS: torch.Tensor, src_padding_BS: torch.Tensor, *,
               task_ids: Optional[torch.Tensor] = None, tgt_lang_ids: Optional[torch.Tensor] = None) -> EncoderOutput:
        ids = Ids(task_ids, tgt_lang_ids)
        padding_BS = src_padding_BS.bool()
        memory_SBD = self.encoder(self.embed(src_tokens_BS), padding_BS.t(), ids)
        return EncoderOutput(memory_SBD, padding_BS, ids)

    def _decode(self, enc: EncoderOutput, tgt_BT: torch.Tensor, tgt_padding_BT: torch.Tensor) -> torch.Tensor:
        """Logits [B, T, V] of the decoder over `enc` (rows aligned)."""
        hidden_TBD = self.decoder(self.embed(tgt_BT), tgt_padding_BT.t(), enc.ids, enc.memory_SBD, enc.padding_BS)
        return F.linear(hidden_TBD, self.embed_tokens.weight).transpose(0, 1)

    @torch.no_grad()
    def forward(self, src_tokens: torch.Tensor, src_padding_mask: torch.Tensor, tgt_input: torch.Tensor,
                tgt_padding_mask: torch.Tensor, task_ids: Optional[torch.Tensor] = None,
                tgt_lang_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Teacher-forced logits [B, T, V]; masks are True at padding (the trainer's batch convention)."""
        enc = self.encode(src_tokens, src_padding_mask, task_ids=task_ids, tgt_lang_ids=tgt_lang_ids)
        return self._decode(enc, tgt_input, tgt_padding_mask.bool())

    @torch.no_grad()
    def decode_step(self, enc: EncoderOutput, prefix_NT: torch.Tensor, src_index_N: torch.Tensor) -> torch.Tensor:
        """Log-probabilities [N, V] of the token after each prefix (bos first); hypothesis n reads source
        `src_index_N[n]`. The whole prefix is re-run, as the trained model does."""
        sub = EncoderOutput(enc.memory_SBD.index_select(1, src_index_N), enc.padding_BS.index_select(0, src_index_N),
                            enc.ids.select(src_index_N))
        logits_NTV = self._decode(sub, prefix_NT, torch.zeros_like(prefix_NT, dtype=torch.bool))
        return torch.log_softmax(logits_NTV[:, -1].float(), dim=-1)

    def step_fn(self, enc: EncoderOutput):
        """The full-recompute step function over an encoded batch (`generation.PrefixDecoder`)."""
        return lambda prefix_NT, src_index_N: self.decode_step(enc, prefix_NT, src_index_N)

    # ---------------------------------------------------------------------------------- incremental decoding
    def start_decoding(self, enc: EncoderOutput, beam_size: int) -> DecodingState:
        """Decoding state of `enc`'s sentences with `beam_size` rows each (row b*K + k: sentence b, beam k)."""
        return DecodingState(beam_size, torch.arange(enc.padding_BS.shape[0], device=enc.padding_BS.device),
                             enc.padding_BS, masked_mean(enc.memory_SBD, enc.padding_BS.t()))

    @torch.no_grad()
    def decode_next(self, enc: EncoderOutput, state: DecodingState, tokens_N: torch.Tensor) -> torch.Tensor:
        """Append `tokens_N` (bos first) to the rows; log-probabilities [N, V] of their next token."""
        rows_N = state.sources_L.repeat_interleave(state.beam_size)
        ids, memory_mean_ND = enc.ids.select(rows_N), state.memory_mean_BD.index_select(0, rows_N)
        x_1ND = self.embed(tokens_N.view(-1, 1), start=state.length)
        for index, layer in enumerate(self.decoder.layers):
            x_1ND = layer.step(x_1ND, ids, state, index, enc.memory_SBD, memory_mean_ND)
        state.length += 1
        logits_NV = F.linear(self.decoder.final_norm(x_1ND)[0], self.embed_tokens.weight)
        return torch.log_softmax(logits_NV.float(), dim=-1)

    @staticmethod
    def reorder(state: DecodingState, parent_N: torch.Tensor, sentences_L: Optional[torch.Tensor] = None) -> None:
        """Row n continues former row parent_N[n]; `sentences_L`: the formerly live sentences that stay."""
        state.self_kv = {i: (k.index_select(0, parent_N), v.index_select(0, parent_N))
                         for i, (k, v) in state.self_kv.items()}
        if sentences_L is not None:
            state.sources_L = state.sources_L.index_select(0, sentences_L)
            state.memory_padding_LS = state.memory_padding_LS.index_select(0, sentences_L)
            state.cross_kv = {i: (k.index_select(0, sentences_L), v.index_select(0, sentences_L))
                              for i, (k, v) in state.cross_kv.items()}


class ReferenceDecoder:
    """`generation.IncrementalDecoder` over a `ReferenceModel` and an encoded batch."""

    def __init__(self, model: ReferenceModel, enc: EncoderOutput, beam_size: int):
        self.model, self.enc = model, enc
        self.state = model.start_decoding(enc, beam_size)

    def step(self, tokens_N: torch.Tensor) -> torch.Tensor:
        return self.model.decode_next(self.enc, self.state, tokens_N)

    def reorder(self, parent_N: torch.Tensor, sentences_L: Optional[torch.Tensor] = None) -> None:
        self.model.reorder(self.state, parent_N, sentences_L)
