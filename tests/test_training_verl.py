"""The training layer through VERL's own interfaces on the CPU: reward managers scoring a
DataProto with our rewards, GRPO advantages, the RL and SFT dataset classes reading our parquet,
Hydra composition and validation of our configs, and the lckv-backend variant (external_lib
import, attn_implementation, a training forward/backward under the streaming policy)."""
import asyncio
import importlib
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("verl")

from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import OmegaConf, open_dict  # noqa: E402

from training import data as D  # noqa: E402
from training import rewards  # noqa: E402
from training.prompts import FORMATS  # noqa: E402

pytestmark = [pytest.mark.verl,
              pytest.mark.filterwarnings("ignore:Disabled critic as algorithm.adv_estimator:UserWarning")]


@pytest.fixture(autouse=True)
def _restore_default_lckv_policy():
    """training.lckv_backend sets the process-wide default policy of "lckv"; put back "full"."""
    yield
    from lckv.integrations.hf import register

    register("full")

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "training" / "configs")
REWARD_CONFIGS = ["grpo_ao", "grpo_id", "grpo_id_c", "grpo_id_q", "grpo_r_judge"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _seed():
    return int.from_bytes(os.urandom(4), "little")


def _compose(name, overrides=()):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        return compose(config_name=name, overrides=list(overrides))


@pytest.fixture(scope="module")
def built(hotpotqa_file, tmp_path_factory):
    """Parquet files built from 12 real HotpotQA rows."""
    out = tmp_path_factory.mktemp("lckv_data")
    D.main(["--input", str(hotpotqa_file), "--output", str(out), "--limit", "12", "--num-negatives", "10",
            "--max-tokens", "3000", "--val-fraction", "0.25", "--no-progress"])
    return out


@pytest.fixture(scope="module")
def tokenizer(built):
    """A byte-level BPE trained in-process on the built prompts, with a chat template."""
    import pandas as pd
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [m["content"] for p in pd.read_parquet(built / "train_id_c.parquet")["prompt"] for m in p]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|pad|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=800, special_tokens=special,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|end|>",
                                   bos_token="<|end|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _responses(row, rng):
    """Five responses of mixed quality for one RL row (a GRPO group)."""
    gt, extra = row["reward_model"]["ground_truth"], row["extra_info"]
    answer, gold = gt["answers"][0], list(gt["gold_ids"])
    docs = list(extra["documents"])
    wrong = [i for i in range(len(docs)) if i not in gold]
    tags = lambda ids: ", ".join(f"[DOC {i}]" for i in ids)  # noqa: E731
    return [
        f"{tags(gold)}\nThe answer is: {answer}",
        f"{tags(gold[:1] + wrong[:2])}\nThe answer is: {answer}",
        f"{tags(rng.sample(wrong, 2))}\nThe answer is: not {rng.random():.3f}",
        "Relevant documents:\n" + "\n".join(f"[DOC {i}] {docs[i]}" for i in gold) + f"\nThe answer is: {answer}",
        f"I do not know. {rng.random()}",
    ]


def _dataproto(tokenizer, rows, responses_per_row, prompt_len=48, response_len=1024):
    """A DataProto as VERL's rollout produces it: left-padded prompts, right-padded responses."""
    from verl import DataProto

    prompts, responses, masks, uids = [], [], [], []
    non_tensor = {"data_source": [], "reward_model": [], "extra_info": []}
    pad = tokenizer.pad_token_id
    for r, (row, group) in enumerate(zip(rows, responses_per_row)):
        prompt_ids = tokenizer(row["prompt"][1]["content"][-200:], add_special_tokens=False)["input_ids"][-prompt_len:]
        for text in group:
            resp = tokenizer(text, add_special_tokens=False)["input_ids"]
            assert len(resp) <= response_len
            assert tokenizer.decode(resp, skip_special_tokens=True) == text  # byte-level round trip
            p = [pad] * (prompt_len - len(prompt_ids)) + prompt_ids
            q = resp + [pad] * (response_len - len(resp))
            prompts.append(p)
            responses.append(q)
            masks.append([0] * (prompt_len - len(prompt_ids)) + [1] * len(prompt_ids) + [1] * len(resp)
                         + [0] * (response_len - len(resp)))
            uids.append(f"uid{r}")
            non_tensor["data_source"].append(row["data_source"])
            non_tensor["reward_model"].append(dict(row["reward_model"]))
            non_tensor["extra_info"].append(dict(row["extra_info"]))
    prompts, responses = torch.tensor(prompts), torch.tensor(responses)
    batch = {"prompts": prompts, "responses": responses, "input_ids": torch.cat([prompts, responses], 1),
             "attention_mask": torch.tensor(masks)}
    non_tensor = {k: np.array(v, dtype=object) for k, v in non_tensor.items()}
    non_tensor["uid"] = np.array(uids, dtype=object)
    return DataProto.from_dict(tensors=batch, non_tensors=non_tensor)


def _rows(path, n):
    import pandas as pd

    return [r for _, r in pd.read_parquet(path).head(n).iterrows()]


@pytest.mark.parametrize("fmt", ["id", "id_c"])
def test_verl_reward_managers_score_a_batch_and_grpo_advantages(built, tokenizer, fmt):
    from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage
    from verl.trainer.ppo.reward import get_custom_reward_fn, load_reward_manager
    from verl.workers.reward_manager.naive import NaiveRewardManager

    seed = _seed()
    rng = random.Random(seed)
    cfg = _compose(f"grpo_{fmt}")
    rows = _rows(built / f"train_{fmt}.parquet", 3)
    groups = [_responses(r, rng) for r in rows]
    batch = _dataproto(tokenizer, rows, groups)
    expected = torch.tensor([getattr(rewards, f"compute_score_{fmt}")(
        r["data_source"], text, r["reward_model"]["ground_truth"], r["extra_info"]) for r, g in zip(rows, groups)
        for text in g])
    assert expected.max() > expected.min(), seed

    # legacy NaiveRewardManager with the function VERL loads from reward.custom_reward_function
    fn = get_custom_reward_fn(cfg)
    assert fn is not None
    manager = NaiveRewardManager(tokenizer=tokenizer, num_examine=0, compute_score=fn)
    out = manager(batch, return_dict=True)
    token_rewards = out["reward_tensor"]
    assert token_rewards.shape == batch.batch["responses"].shape
    assert torch.allclose(token_rewards.sum(-1), expected), seed
    valid = batch.batch["attention_mask"][:, batch.batch["prompts"].shape[1]:].sum(-1)
    nonzero = token_rewards != 0
    assert all(not nonzero[i].any() or nonzero[i].nonzero().flatten().tolist() == [int(valid[i]) - 1]
               for i in range(len(valid)))

    # the reward-loop manager built by load_reward_manager from the composed config
    loop_manager = load_reward_manager(cfg, tokenizer)
    scores = [loop_manager.loop.run_until_complete(loop_manager.run_single(batch[i:i + 1]))["reward_score"]
              for i in range(len(batch))]
    assert torch.allclose(torch.tensor(scores, dtype=torch.float32), expected), seed
    rm_scores = type(loop_manager).assemble_rm_scores(batch, scores)
    assert torch.allclose(rm_scores, token_rewards)

    # GRPO advantage on those rewards, against the group-normalised oracle
    response_mask = batch.batch["attention_mask"][:, batch.batch["prompts"].shape[1]:].float()
    adv, ret = compute_grpo_outcome_advantage(token_rewards, response_mask, batch.non_tensor_batch["uid"])
    per_seq = expected.view(len(rows), -1)
    want = (per_seq - per_seq.mean(1, keepdim=True)) / (per_seq.std(1, keepdim=True) + 1e-6)
    got = (adv * response_mask).sum(-1) / response_mask.sum(-1)
    assert torch.allclose(got, want.flatten(), atol=1e-5), seed
    assert torch.equal(adv, ret)
    assert torch.all(adv[response_mask == 0] == 0)


def test_verl_rl_dataset_loads_our_parquet(built, tokenizer, monkeypatch, tmp_path):
    from verl.utils.dataset.rl_dataset import RLHFDataset, collate_fn

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    cfg = _compose("grpo_id_q")
    data_cfg = OmegaConf.create(OmegaConf.to_container(cfg.data, resolve=False))
    with open_dict(data_cfg):
        data_cfg.cache_dir = str(tmp_path / "verl_cache")
        data_cfg.filter_overlong_prompts_workers = 1
    path = str(built / "train_id_q.parquet")
    rows = _rows(path, 100)
    ds = RLHFDataset(data_files=[path], tokenizer=tokenizer, config=data_cfg)
    assert len(ds) == len(rows)  # the 32K cap keeps every prompt
    item = ds[1]
    assert item["raw_prompt"] == [dict(m) for m in rows[1]["prompt"]]
    assert item["index"] == 1 and item["extra_info"]["format"] == "id_q"
    assert item["reward_model"]["ground_truth"]["answers"] == list(rows[1]["reward_model"]["ground_truth"]["answers"])
    batch = collate_fn([ds[i] for i in range(3)])
    assert batch["data_source"].shape == (3,) and batch["dummy_tensor"].shape == (3, 1)
    # VERL's length filter with our chat template: a smaller cap drops the longest prompts
    lengths = [len(tokenizer.apply_chat_template([dict(m) for m in r["prompt"]], add_generation_prompt=True,
                                                 tokenize=True, return_dict=False)) for r in rows]
    cap = int(np.median(lengths))
    with open_dict(data_cfg):
        data_cfg.max_prompt_length = cap
    small = RLHFDataset(data_files=[path], tokenizer=tokenizer, config=data_cfg)
    assert len(small) == sum(n <= cap for n in lengths)


def test_verl_sft_dataset_loads_our_parquet(built, tokenizer, tmp_path, monkeypatch):
    from verl.utils.dataset.multiturn_sft_dataset import MultiTurnSFTDataset

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    cfg = _compose("sft")
    data_cfg = OmegaConf.create(OmegaConf.to_container(cfg.data, resolve=False))
    with open_dict(data_cfg):
        data_cfg.pad_mode = "right"
        data_cfg.max_length = 4096
        data_cfg.truncation = "right"
    path = str(built / "sft_train.parquet")
    ds = MultiTurnSFTDataset(parquet_files=[path], tokenizer=tokenizer, config=data_cfg)
    rows = _rows(path, 100)
    assert len(ds) == len(rows)
    item = ds[0]
    ids, loss_mask = item["input_ids"], item["loss_mask"]
    target = tokenizer.decode(ids[loss_mask.bool()], skip_special_tokens=True)
    answer = rows[0]["messages"][-1]["content"]
    assert answer in target and target.count("The answer is:") == 1  # loss only on the assistant turn


@pytest.mark.parametrize("name", REWARD_CONFIGS + ["grpo_lckv"])
def test_grpo_configs_compose_and_validate(name):
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config

    cfg = _compose(name)
    fmt = name.removeprefix("grpo_")
    fmt = "id" if fmt == "lckv" else fmt
    assert cfg.reward.custom_reward_function.path == "pkg://training.rewards"
    assert cfg.reward.custom_reward_function.name == f"compute_score_{fmt}"
    assert cfg.data.train_files.endswith(f"train_{fmt}.parquet")
    actor, rollout = cfg.actor_rollout_ref.actor, cfg.actor_rollout_ref.rollout
    assert cfg.algorithm.adv_estimator == "grpo" and rollout.n == 5 and rollout.name == "vllm"
    assert actor.optim.lr == 1e-6 and actor.use_kl_loss and actor.kl_loss_coef == 0.001
    assert actor.kl_loss_type == "low_var_kl" and not cfg.algorithm.use_kl_in_reward
    assert cfg.data.train_batch_size == 256 and actor.ppo_mini_batch_size == 64
    assert cfg.data.max_prompt_length == 32768 and cfg.data.max_response_length == 2048
    assert cfg.trainer.total_epochs == 2 and cfg.trainer.save_freq == 10
    validate_config(cfg, use_reference_policy=need_reference_policy(cfg), use_critic=need_critic(cfg))
    assert need_reference_policy(cfg) and not need_critic(cfg)
    # the reward function VERL would load is ours
    from verl.trainer.ppo.reward import get_custom_reward_fn

    fn = get_custom_reward_fn(cfg)
    assert fn(data_source="hotpotqa", solution_str="[DOC 0]\nThe answer is: x",
              ground_truth={"answers": ["x"], "gold_ids": [0]}, extra_info={"documents": ["a\nb"]}) > 0


def test_sft_config_composes():
    cfg = _compose("sft", ["model.path=/tmp/some-model"])
    assert cfg.optim.lr == 1e-6 and cfg.data.messages_key == "messages"
    assert cfg.data.train_files.endswith("sft_train.parquet") and cfg.model.path == "/tmp/some-model"


@pytest.fixture
def tiny_model_dir(tmp_path, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.bos_token_id)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    return tmp_path / "tiny"


def _streaming_reference_mask(attention_mask, sink, window):
    """[B, 1, L, L] additive mask: causal, sink + window by slot position, key padding."""
    L = attention_mask.shape[1]
    q = torch.arange(L)[:, None]
    k = torch.arange(L)[None, :]
    allowed = (k <= q) & ((k < sink) | (k > q - window))
    allowed = allowed[None, None] & attention_mask[:, None, None, :].bool()
    return torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)


@pytest.mark.parametrize("form", ["yaml", "cli"])
def test_lckv_variant_imports_backend_and_trains_under_streaming(form, tiny_model_dir, monkeypatch):
    from transformers import AutoModelForCausalLM
    from transformers.modeling_utils import AttentionInterface
    from verl.utils.config import omega_conf_to_dataclass

    seed = _seed()
    torch.manual_seed(seed)
    sink, window = 2, 5
    monkeypatch.setenv("LCKV_TRAIN_POLICY", "streaming")
    monkeypatch.setenv("LCKV_TRAIN_POLICY_SETTINGS", f"sink={sink},window={window}")
    if form == "yaml":
        cfg = _compose("grpo_lckv", [f"actor_rollout_ref.model.path={tiny_model_dir}"])
        env = OmegaConf.to_container(cfg.ray_kwargs.ray_init.runtime_env.env_vars, resolve=True)
        assert env == {"LCKV_TRAIN_POLICY": "streaming", "LCKV_TRAIN_POLICY_SETTINGS": f"sink={sink},window={window}"}
    else:
        cfg = _compose("grpo_id", [f"actor_rollout_ref.model.path={tiny_model_dir}",
                                   "actor_rollout_ref.model.external_lib=training.lckv_backend",
                                   "+actor_rollout_ref.model.override_config.attn_implementation=lckv",
                                   "actor_rollout_ref.model.use_remove_padding=False"])
    import sys

    sys.modules.pop("training.lckv_backend", None)  # VERL's import must be the one that registers
    model_cfg = omega_conf_to_dataclass(cfg.actor_rollout_ref.model)
    backend = sys.modules["training.lckv_backend"]
    assert backend.POLICY == "streaming" and backend.POLICY_SETTINGS == {"sink": sink, "window": window}
    assert "lckv" in AttentionInterface._global_mapping
    assert model_cfg.hf_config._attn_implementation == "lckv"

    model = AutoModelForCausalLM.from_config(model_cfg.hf_config)
    ref = AutoModelForCausalLM.from_config(model_cfg.hf_config.__class__.from_dict(
        {**model_cfg.hf_config.to_dict(), "_attn_implementation": "eager"}))
    ref.load_state_dict(model.state_dict())
    assert model.config._attn_implementation == "lckv" and ref.config._attn_implementation == "eager"
    ids = torch.randint(5, len(model_cfg.tokenizer), (3, 23))
    mask = torch.ones_like(ids)
    mask[1, 17:] = 0  # right padding, as VERL's actor batches
    mask[2, 9:] = 0
    out = model(input_ids=ids, attention_mask=mask)
    want = ref(input_ids=ids, attention_mask=_streaming_reference_mask(mask, sink, window))
    keep = mask.bool()
    torch.testing.assert_close(out.logits[keep], want.logits[keep], rtol=1e-4, atol=1e-4, msg=f"seed {seed}")
    # and it differs from full attention once the window is exceeded (the mask really applies)
    full = ref(input_ids=ids, attention_mask=mask)
    assert (out.logits[0, window + sink + 1:] - full.logits[0, window + sink + 1:]).abs().max() > 1e-4
    # gradients flow through the backend (an actor update)
    loss = torch.nn.functional.cross_entropy(out.logits[keep][:-1], ids[keep][1:])
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


def test_backend_settings_parsing(monkeypatch):
    import training.lckv_backend as backend

    assert backend.parse_settings("sink=4, window=128") == {"sink": 4, "window": 128}
    assert backend.parse_settings("") == {}
    with pytest.raises(ValueError, match="key=value"):
        backend.parse_settings("sink:4")
    monkeypatch.setenv("LCKV_TRAIN_POLICY", "no_such_policy")
    with pytest.raises(Exception, match="no_such_policy"):
        importlib.reload(backend)
    monkeypatch.setenv("LCKV_TRAIN_POLICY", "full")
    monkeypatch.delenv("LCKV_TRAIN_POLICY_SETTINGS", raising=False)
    importlib.reload(backend)
    assert backend.POLICY == "full"


def test_every_format_has_a_config_and_a_reward():
    for fmt in FORMATS:
        assert (Path(CONFIG_DIR) / f"grpo_{fmt}.yaml").is_file()
        assert callable(getattr(rewards, f"compute_score_{fmt}"))
