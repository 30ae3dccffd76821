"""Structured pruning of a BERT-family sequence classifier into a smaller one that loads with transformers' own
classes (serving needs no code of ours to run it).

Three cuts, each optional:

- **layers**: the student keeps ``layers`` of the encoder's blocks, evenly spaced, the first and the last always
  (the head was trained on the last one's output);
- **embedding width**: the token, position and type embeddings are factorised. A BERT adds them in the hidden
  width H and normalises (LayerNorm); an ALBERT adds them in a narrower width E, normalises there, then projects
  to H. The student is an ALBERT whose E-wide embeddings are the teacher's centred embeddings expressed in their
  top ``E - 1`` principal directions (a truncated SVD), placed in E coordinates whose mean is zero (so ALBERT's
  LayerNorm centres nothing), and whose projection carries the teacher's LayerNorm scale and shift. With
  ``E - 1`` at least H - 1 (every direction a centred vector can take) the student computes what the teacher
  computes, up to float rounding; narrower, it computes the teacher on the nearest vectors the E - 1
  directions can express. ALBERT shares weights between layers only when asked; here every layer has its own;
- **feed-forward width**: each kept block keeps ``intermediate_size`` of its feed-forward neurons, those whose
  input and output weights have the largest norms together (a neuron's contribution is its activation times its
  output column; the activation grows with its input row). The feed-forward is two thirds of a block's
  multiplications, so narrowing it speeds every block kept: on MiniLM, four blocks with half the neurons serve
  faster than three whole ones (trained, they kept less of the teacher's accuracy on the sentiment benchmark;
  services/training/README.md has the numbers).

The vocabulary is half or more of a small BERT's weights (MiniLM-L6: 11.7M of 22.7M), so halving a model's size
needs the second cut, not only fewer layers. Training (with distillation from the original, see
``gristmill.training.ml.distillation``) then recovers what the cuts lost.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AlbertConfig, AlbertForSequenceClassification

# The model types whose classifier is a post-LayerNorm BERT encoder under ``model.bert``, with a tanh pooler on the
# first token and a linear classifier (what the mapping below reads): the resolver's SLIMMABLE_MODEL_TYPES.


@dataclass(frozen=True)
class SlimShape:
    """The student's shape: encoder layers kept (0: all) and embedding width (0: the teacher's hidden size,
    not factorised)."""

    layers: int = 0
    embedding_size: int = 0
    intermediate_size: int = 0


def kept_layers(total: int, keep: int) -> list[int]:
    """``keep`` of ``total`` layer indexes, evenly spaced, first and last included (all when ``keep`` is 0 or
    ``total``)."""
    if keep <= 0 or keep >= total:
        return list(range(total))
    if keep == 1:
        return [total - 1]
    return sorted({round(i * (total - 1) / (keep - 1)) for i in range(keep)})


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _zero_mean_basis(width: int) -> torch.Tensor:
    """``width`` x (``width`` - 1) with orthonormal columns, each orthogonal to the all-ones vector: coordinates
    in it always average to zero."""
    ones_first = torch.eye(width, dtype=torch.float64)
    ones_first[:, 0] = 1.0
    q, _ = torch.linalg.qr(ones_first)
    basis: torch.Tensor = q[:, 1:]
    return basis


def _principal_directions(tables: list[torch.Tensor], rank: int) -> torch.Tensor:
    """H x ``rank``: the top principal directions of the rows of ``tables`` (each already centred), every table
    weighted alike whatever its row count (a position's embedding is in every input; a rare token's is not)."""
    weighted = torch.cat([t / math.sqrt(t.shape[0]) for t in tables])
    _, _, vh = torch.linalg.svd(weighted, full_matrices=False)
    directions: torch.Tensor = vh[:rank].T
    return directions


def kept_neurons(layer: Any, keep: int) -> torch.Tensor:
    """The indexes (ascending) of the ``keep`` feed-forward neurons of a BERT block whose input row and output
    column have the largest product of norms; all of them when ``keep`` is 0 or the block's width."""
    weight_in = layer.intermediate.dense.weight.detach()  # I x H
    weight_out = layer.output.dense.weight.detach()  # H x I
    width = weight_in.shape[0]
    if keep <= 0 or keep >= width:
        return torch.arange(width)
    score = weight_in.norm(dim=1) * weight_out.norm(dim=0)
    return torch.sort(torch.topk(score, keep).indices).values


def slim_bert_classifier(teacher: Any, shape: SlimShape) -> torch.nn.Module:
    """The student of ``teacher`` (a ``BertForSequenceClassification``) cut to ``shape``: a
    ``BertForSequenceClassification`` when the embeddings are kept, an ``AlbertForSequenceClassification`` when
    they are factorised. The teacher is not changed."""
    config = teacher.config
    hidden = int(config.hidden_size)
    keep = kept_layers(int(config.num_hidden_layers), shape.layers)
    teacher_width = int(config.intermediate_size)
    width_kept = shape.intermediate_size if 0 < shape.intermediate_size < teacher_width else teacher_width
    neurons = [kept_neurons(teacher.bert.encoder.layer[i], width_kept) for i in keep]
    if not shape.embedding_size or shape.embedding_size >= hidden + 1:
        return _fewer_layers(teacher, keep, neurons)
    width = shape.embedding_size
    student_config = AlbertConfig(  # type: ignore[call-arg]  # num_labels & co. go to PretrainedConfig
        vocab_size=config.vocab_size,
        embedding_size=width,
        hidden_size=hidden,
        num_hidden_layers=len(keep),
        num_hidden_groups=len(keep),
        inner_group_num=1,
        num_attention_heads=config.num_attention_heads,
        intermediate_size=width_kept,
        hidden_act=config.hidden_act,
        hidden_dropout_prob=config.hidden_dropout_prob,
        attention_probs_dropout_prob=config.attention_probs_dropout_prob,
        classifier_dropout_prob=(
            config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        ),
        max_position_embeddings=config.max_position_embeddings,
        type_vocab_size=config.type_vocab_size,
        layer_norm_eps=config.layer_norm_eps,
        pad_token_id=config.pad_token_id,
        num_labels=config.num_labels,
        id2label=dict(config.id2label),
        label2id=dict(config.label2id),
        problem_type=config.problem_type,
        architectures=["AlbertForSequenceClassification"],
    )
    student: Any = AlbertForSequenceClassification(student_config)
    bert = teacher.bert
    with torch.no_grad():
        _factorised_embeddings(bert.embeddings, student.albert, width)
        for group, index, kept in zip(student.albert.encoder.albert_layer_groups, keep, neurons, strict=True):
            _copy_layer(bert.encoder.layer[index], group.albert_layers[0], kept)
        student.albert.pooler.load_state_dict(bert.pooler.dense.state_dict())
        student.classifier.load_state_dict(teacher.classifier.state_dict())
    assert isinstance(student, torch.nn.Module)
    return student


def _fewer_layers(teacher: Any, keep: list[int], neurons: list[torch.Tensor]) -> torch.nn.Module:
    config = teacher.config.__class__.from_dict(teacher.config.to_dict())
    config.num_hidden_layers = len(keep)
    config.intermediate_size = len(neurons[0])
    student: torch.nn.Module = type(teacher)(config)
    state = teacher.state_dict()
    renamed = {}
    for name, value in state.items():
        prefix = "bert.encoder.layer."
        if name.startswith(prefix):
            index, rest = name[len(prefix) :].split(".", 1)
            if int(index) not in keep:
                continue
            kept = neurons[keep.index(int(index))]
            if rest.startswith("intermediate.dense."):  # weight I x H, bias I: rows are neurons
                value = value[kept]
            elif rest == "output.dense.weight":  # H x I: columns are neurons
                value = value[:, kept]
            name = f"{prefix}{keep.index(int(index))}.{rest}"
        renamed[name] = value
    student.load_state_dict(renamed)
    return student


def _factorised_embeddings(embeddings: Any, albert: Any, width: int) -> None:
    """ALBERT's E-wide embeddings and projection from a BERT's H-wide embeddings (see the module's docstring)."""
    hidden = embeddings.word_embeddings.weight.shape[1]
    rank = min(width - 1, hidden - 1)

    def centred(table: torch.Tensor) -> torch.Tensor:
        t = table.detach().to(torch.float64)
        return t - t.mean(dim=1, keepdim=True)

    words = centred(embeddings.word_embeddings.weight)
    positions = centred(embeddings.position_embeddings.weight)
    types = centred(embeddings.token_type_embeddings.weight)
    directions = _principal_directions([words, positions, types], rank)  # H x rank
    zero_mean = _zero_mean_basis(width)[:, :rank]  # E x rank
    to_student = directions @ zero_mean.T  # H x E: centred H-vector -> E coordinates averaging to zero
    target = albert.embeddings
    dtype = target.word_embeddings.weight.dtype
    target.word_embeddings.weight.copy_((words @ to_student).to(dtype))
    target.position_embeddings.weight.copy_((positions @ to_student).to(dtype))
    target.token_type_embeddings.weight.copy_((types @ to_student).to(dtype))
    target.LayerNorm.weight.fill_(1.0)
    target.LayerNorm.bias.zero_()
    target.LayerNorm.eps = embeddings.LayerNorm.eps
    # LayerNorm divides by the RMS over its width: sqrt(|z|^2 / E) in the student, sqrt(|x|^2 / H) in the teacher,
    # |z| = |x| (orthonormal coordinates); the projection rescales by sqrt(H / E) and applies the teacher's gamma
    # and beta.
    gamma = embeddings.LayerNorm.weight.detach().to(torch.float64)
    projection = gamma[:, None] * to_student * math.sqrt(hidden / width)  # H x E
    mapping = albert.encoder.embedding_hidden_mapping_in
    mapping.weight.copy_(projection.to(dtype))
    mapping.bias.copy_(embeddings.LayerNorm.bias.detach())


def _copy_layer(layer: Any, albert_layer: Any, neurons: torch.Tensor) -> None:
    """A BERT block into an ALBERT block: the same computation under other names, with the feed-forward's
    ``neurons`` only."""
    attention = albert_layer.attention
    attention.query.load_state_dict(layer.attention.self.query.state_dict())
    attention.key.load_state_dict(layer.attention.self.key.state_dict())
    attention.value.load_state_dict(layer.attention.self.value.state_dict())
    attention.dense.load_state_dict(layer.attention.output.dense.state_dict())
    attention.LayerNorm.load_state_dict(layer.attention.output.LayerNorm.state_dict())
    albert_layer.ffn.weight.copy_(layer.intermediate.dense.weight[neurons])
    albert_layer.ffn.bias.copy_(layer.intermediate.dense.bias[neurons])
    albert_layer.ffn_output.weight.copy_(layer.output.dense.weight[:, neurons])
    albert_layer.ffn_output.bias.copy_(layer.output.dense.bias)
    albert_layer.full_layer_layer_norm.load_state_dict(layer.output.LayerNorm.state_dict())
