"""Evaluation: TOFU metrics (``metrics``), the TOFU protocol that runs them (``tofu``) and the
loaders of TOFU-format data (``tofu_data``). Above the unlearning layer (it evaluates its models and
shares its collator), below the application."""
from . import metrics, tofu, tofu_data
from .metrics import (OU_EPS, AnswerLogProbs, answer_log_probs, answer_probability, forget_quality, greedy_generate,
                      min_k_prob_mia_auc, min_k_score, min_k_scores, model_utility, normalised_probability, privleak,
                      rouge_l_recall, truth_ratio, truth_ratio_score)
from .tofu import (FORGET_ITEMS_KEY, TOFU_SET_PREFIXES, evaluate_tofu, forget_set_identity, load_retain_eval,
                   resolve_tofu_sets)
from .tofu_data import (FIELD_ALIASES, QA_FILE_SUFFIXES, TOFU_HOLDOUT_SPLITS, find_tofu_eval_sets, load_qa_split,
                        load_tofu_eval_sets, validate_qa_items)

__all__ = metrics.__all__ + tofu.__all__ + tofu_data.__all__
