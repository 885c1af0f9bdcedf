"""Data selection: which examples of a super-batch to train on (JEST, arXiv 2406.17711)."""

from synrep.selection.jest import (
    GlobalSelection,
    MultiposGroups,
    MultiposPairs,
    PairScores,
    SigmoidPairs,
    SoftmaxPairs,
    chunk_sizes,
    conditional_scores,
    easy_reference,
    global_joint_sample,
    hard_learner,
    independent_sample,
    joint_sample,
    joint_sample_from_embeddings,
    learnability,
    multipos_group_loss,
    multipos_pair_loss,
    per_example_scores,
    score_matrix,
    selected_count,
    sigmoid_pair_loss,
    softmax_batch_loss,
    softmax_pair_loss,
)

__all__ = [
    "GlobalSelection", "MultiposGroups", "MultiposPairs", "PairScores", "SigmoidPairs",
    "SoftmaxPairs", "chunk_sizes", "conditional_scores", "easy_reference", "global_joint_sample",
    "hard_learner", "independent_sample", "joint_sample", "joint_sample_from_embeddings",
    "learnability", "multipos_group_loss", "multipos_pair_loss", "per_example_scores",
    "score_matrix", "selected_count", "sigmoid_pair_loss", "softmax_batch_loss",
    "softmax_pair_loss",
]
