"""Classifiers that start from the class-mean prototypes and refine them with
the episode at inference time (easyfsl's SimpleShot, Finetune,
TransductiveFinetuning, TIM, PT-MAP, BD-CSPN and LaplacianShot), batched over
episodes: every refinement step runs on ``[B, ...]`` tensors, and an
iteration that stops at convergence stops per episode."""

from typing import NamedTuple, Tuple

import torch
import torch.nn.functional as F

from .. import formulas, ops
from .few_shot import FewShotClassifier

__all__ = ["SimpleShot", "Finetune", "TransductiveFinetuning", "TIM", "PTMAP", "BDCSPN", "LaplacianShot"]

SINKHORN_MAX_ITERATIONS = 1000


class SupportSet(NamedTuple):
    prototypes: torch.Tensor  # [B, ways, D]
    features: torch.Tensor  # [B, S, D]
    labels: torch.Tensor  # [B, S], int64


class RefinedPrototypes(FewShotClassifier):
    """Base of the methods here: ``refine`` maps the support set and the
    query features ``[B, Q, D]`` to refined prototypes and query scores.

    easyfsl's ``forward`` starts from ``self.prototypes`` and keeps the
    refined prototypes there (a second call refines them further);
    ``score_episodes`` starts from each episode's class means."""

    #: the softmax of ``use_softmax`` is taken of ``temperature * scores``
    temperature = 1.0

    def prepare_support(self, features: torch.Tensor, labels: torch.Tensor, ways: int) -> SupportSet:
        return SupportSet(ops.class_prototypes(features, labels, ways), features, labels)

    def refine(self, support: SupportSet, query_features: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def score_queries(self, support: SupportSet, query_features: torch.Tensor) -> torch.Tensor:
        return self.refine(support, query_features)[1]

    def softmax_if_specified(self, scores: torch.Tensor) -> torch.Tensor:
        return (self.temperature * scores).softmax(-1) if self.use_softmax else scores

    def forward(self, query_images: torch.Tensor) -> torch.Tensor:
        if self.support_state is None:
            raise RuntimeError(
                f"{type(self).__name__}: call process_support_set(support_images, "
                "support_labels) before forward(query_images)"
            )
        support = self.support_state._replace(prototypes=self.prototypes[None])
        prototypes, scores = self.refine(support, self.compute_features(query_images)[None])
        self.prototypes = prototypes[0]
        return self.softmax_if_specified(scores[0])


def cosine_scores(features: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """``[B, n, ways]`` cosine similarities."""
    return formulas.similarity(features, prototypes, "cosine")


class SimpleShot(RefinedPrototypes):
    """SimpleShot (Wang et al. 2019, arXiv:1911.04623): nearest class mean
    by cosine similarity; with ``feature_centering`` (the mean feature of the
    training classes) and ``feature_normalization=2`` it is the paper's CL2N.
    The scores are the cosine similarities to the class means."""

    def refine(self, support, query_features):
        return support.prototypes, cosine_scores(query_features, support.prototypes)


def fine_tune(prototypes: torch.Tensor, loss_of, steps: int, lr: float) -> torch.Tensor:
    """``steps`` of Adam on copies of ``prototypes [B, ways, D]`` minimising
    ``loss_of(prototypes)``, the sum of the episodes' losses: Adam works
    element by element, so each episode's prototypes follow the gradient of
    its own loss, as if fine-tuned alone."""
    prototypes = prototypes.detach().clone().requires_grad_()
    optimizer = torch.optim.Adam([prototypes], lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            optimizer.zero_grad()
            loss_of(prototypes).backward()
            optimizer.step()
    return prototypes.detach()


def entropy(log_probabilities: torch.Tensor) -> torch.Tensor:
    """Entropy of each row of probabilities given as logs ``[..., ways]``."""
    return -(log_probabilities.exp() * log_probabilities).sum(-1)


# The fine-tuning losses: the features stay fixed while the prototypes move,
# so they are normalised once, and each step costs one matrix product of the
# support and query features together forward and one backward (the
# gradient for the prototypes only).


def unit(features: torch.Tensor) -> torch.Tensor:
    return F.normalize(features.detach(), dim=-1)


def cosine_to(unit_features: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    return unit_features @ F.normalize(prototypes, dim=-1).transpose(1, 2)


def mean_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each episode's mean cross-entropy ``[B]`` of logits ``[B, n, ways]``."""
    return F.cross_entropy(logits.transpose(1, 2), labels, reduction="none").mean(1)


class Finetune(RefinedPrototypes):
    """Fine-tuning (Chen et al. 2019, "A Closer Look at Few-shot
    Classification", arXiv:1904.04232): the prototypes are fine-tuned by Adam
    on the support set's cross-entropy of ``temperature`` x cosine
    similarities; queries are scored by cosine similarity to them. The
    backbone is frozen (its parameters stop requiring gradients), and the
    scores carry no gradient."""

    def __init__(
        self,
        *args,
        fine_tuning_steps: int = 200,
        fine_tuning_lr: float = 1e-4,
        temperature: float = 1.0,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.backbone.requires_grad_(False)
        self.fine_tuning_steps, self.fine_tuning_lr, self.temperature = fine_tuning_steps, fine_tuning_lr, temperature

    def refine(self, support, query_features):
        support_unit = unit(support.features)
        prototypes = fine_tune(
            support.prototypes,
            lambda p: mean_cross_entropy(self.temperature * cosine_to(support_unit, p), support.labels).sum(),
            self.fine_tuning_steps,
            self.fine_tuning_lr,
        )
        return prototypes, cosine_scores(query_features, prototypes).detach()


class TransductiveFinetuning(Finetune):
    """Transductive fine-tuning (Dhillon et al. 2020, "A Baseline for
    Few-Shot Image Classification", arXiv:1909.02729), on the prototypes as
    easyfsl does: Adam on the support cross-entropy plus the queries' mean
    prediction entropy, both of softmax(``temperature`` x minus Euclidean
    distance); queries are scored by minus their Euclidean distance to the
    prototypes. The backbone is frozen, and the scores carry no gradient."""

    def __init__(
        self, *args, fine_tuning_steps: int = 25, fine_tuning_lr: float = 5e-5, temperature: float = 1.0, **kwargs
    ):
        super().__init__(
            *args, fine_tuning_steps=fine_tuning_steps, fine_tuning_lr=fine_tuning_lr, temperature=temperature, **kwargs
        )

    @staticmethod
    def is_transductive() -> bool:
        return True

    def refine(self, support, query_features):
        features = torch.cat([support.features, query_features], 1).detach()

        def loss_of(prototypes):
            logits = -self.temperature * formulas.pairwise_distance(features, prototypes, "euclidean")
            support_logits, query_logits = logits.split([support.labels.shape[1], query_features.shape[1]], 1)
            return (
                mean_cross_entropy(support_logits, support.labels) + entropy(query_logits.log_softmax(-1)).mean(1)
            ).sum()

        prototypes = fine_tune(support.prototypes, loss_of, self.fine_tuning_steps, self.fine_tuning_lr)
        return prototypes, -ops.pairwise_distance(query_features, prototypes, "euclidean").detach()


class TIM(RefinedPrototypes):
    """Transductive Information Maximization (Boudiaf et al. 2020,
    arXiv:2008.11297), on the prototypes as easyfsl does: Adam on
    ``cross_entropy_weight`` x the support cross-entropy minus
    (``marginal_entropy_weight`` x the entropy of the queries' mean prediction
    minus ``conditional_entropy_weight`` x their mean prediction entropy),
    predictions being softmax(``temperature`` x cosine similarity); queries
    are scored by cosine similarity. The backbone is frozen, and the scores
    carry no gradient."""

    def __init__(
        self,
        *args,
        fine_tuning_steps: int = 50,
        fine_tuning_lr: float = 1e-4,
        cross_entropy_weight: float = 1.0,
        marginal_entropy_weight: float = 1.0,
        conditional_entropy_weight: float = 0.1,
        temperature: float = 10.0,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.backbone.requires_grad_(False)
        self.fine_tuning_steps, self.fine_tuning_lr, self.temperature = fine_tuning_steps, fine_tuning_lr, temperature
        self.cross_entropy_weight = cross_entropy_weight
        self.marginal_entropy_weight = marginal_entropy_weight
        self.conditional_entropy_weight = conditional_entropy_weight

    @staticmethod
    def is_transductive() -> bool:
        return True

    def refine(self, support, query_features):
        features_unit = unit(torch.cat([support.features, query_features], 1))

        def loss_of(prototypes):
            logits = self.temperature * cosine_to(features_unit, prototypes)
            support_logits, query_logits = logits.split([support.labels.shape[1], query_features.shape[1]], 1)
            cross_entropy = mean_cross_entropy(support_logits, support.labels)
            log_p = query_logits.log_softmax(-1)  # [B, Q, ways]
            conditional = entropy(log_p).mean(1)
            marginal = entropy(log_p.exp().mean(1).log())
            return (
                self.cross_entropy_weight * cross_entropy
                - self.marginal_entropy_weight * marginal
                + self.conditional_entropy_weight * conditional
            ).sum()

        prototypes = fine_tune(support.prototypes, loss_of, self.fine_tuning_steps, self.fine_tuning_lr)
        return prototypes, cosine_scores(query_features, prototypes).detach()


def update_until_converged(update, state, max_iterations: int):
    """Iterates ``state = update(state, iteration)`` for a batch of
    episodes, each until it converges: ``update`` returns the new state (a
    tensor ``[B, ...]``) and a ``[B]`` bool tensor of the episodes that have
    converged with it; a converged episode keeps that state."""
    active = torch.ones(state.shape[0], dtype=torch.bool, device=state.device)
    for iteration in range(max_iterations):
        new_state, converged = update(state, iteration)
        state = torch.where(active.view(-1, *[1] * (state.dim() - 1)), new_state, state)
        active = active & ~converged
        if not bool(active.any()):
            break
    return state


class PTMAP(RefinedPrototypes):
    """PT-MAP (Hu et al. 2021, "Leveraging the Feature Distribution in
    Transfer-based Few-Shot Learning", arXiv:2006.03806), as easyfsl: features
    power-transformed, ``(relu(f) + 1e-6) ** power_factor`` (Eq. 1); each of
    ``fine_tuning_steps`` steps assigns the queries to the prototypes by
    Sinkhorn's optimal transport of ``exp(-lambda_regularization x squared
    distance)`` (Eq. 3; every query's mass 1, every class's Q / ways) and
    moves the prototypes ``fine_tuning_lr`` of the way to the means weighted
    by the support's labels and the queries' assignments (Eq. 6). The scores
    are the final assignments (Sinkhorn stops when its rows' sums change by
    less than 1e-6, so they sum to 1 only about); ``use_softmax`` does not
    change them.

    Differs from easyfsl where the queries do not divide evenly among the
    classes: easyfsl's classes then receive ``Q // ways`` each."""

    def __init__(
        self,
        *args,
        fine_tuning_steps: int = 10,
        fine_tuning_lr: float = 0.2,
        lambda_regularization: float = 10.0,
        power_factor: float = 0.5,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.fine_tuning_steps, self.fine_tuning_lr = fine_tuning_steps, fine_tuning_lr
        self.lambda_regularization, self.power_factor = lambda_regularization, power_factor

    @staticmethod
    def is_transductive() -> bool:
        return True

    def compute_features(self, images: torch.Tensor) -> torch.Tensor:
        return (super().compute_features(images).relu() + 1e-6).pow(self.power_factor)

    def softmax_if_specified(self, scores: torch.Tensor) -> torch.Tensor:
        return scores

    def assignments(self, query_features: torch.Tensor, prototypes: torch.Tensor, epsilon: float = 1e-6):
        """``[B, Q, ways]`` Sinkhorn transport plan of the queries to the
        prototypes, iterated per episode until its rows' sums change by less
        than ``epsilon`` (at most 1000 iterations)."""
        cost = ops.pairwise_distance(query_features, prototypes, "sqeuclidean")
        # Minus each row's least cost: a per-row factor, which the first row
        # normalisation removes, keeps exp from underflowing to 0 everywhere.
        plan = torch.exp(-self.lambda_regularization * (cost - cost.amin(-1, keepdim=True)))
        plan = plan / plan.sum((1, 2), keepdim=True)
        per_class = query_features.shape[1] / prototypes.shape[1]

        def sinkhorn_step(plan, _):
            row_sums = plan.sum(2, keepdim=True)
            plan = plan / (row_sums + 1e-10)
            plan = plan * (per_class / (plan.sum(1, keepdim=True) + 1e-10))
            return plan, ((row_sums - plan.sum(2, keepdim=True)).abs() < epsilon).flatten(1).all(1)

        return update_until_converged(sinkhorn_step, plan, SINKHORN_MAX_ITERATIONS)

    def refine(self, support, query_features):
        prototypes = support.prototypes
        support_assignments = F.one_hot(support.labels, prototypes.shape[1]).to(prototypes.dtype)
        features = torch.cat([support.features, query_features], 1)
        for _ in range(self.fine_tuning_steps):
            assignments = torch.cat([support_assignments, self.assignments(query_features, prototypes)], 1)
            means = (assignments.transpose(1, 2) @ features) / assignments.sum(1)[..., None]
            prototypes = prototypes + self.fine_tuning_lr * (means - prototypes)
        return prototypes, self.assignments(query_features, prototypes)


class BDCSPN(RefinedPrototypes):
    """BD-CSPN (Liu et al. 2020, "Prototype Rectification for Few-Shot
    Learning", arXiv:1911.10713), as easyfsl: the queries are shifted by the
    difference of the support's and the queries' mean features, each query
    takes the class of its most similar prototype, and each prototype
    becomes the mean of its support features and its pseudo-labelled shifted
    queries weighted by ``exp(cosine similarity)``; queries are scored by
    cosine similarity to the rectified prototypes."""

    @staticmethod
    def is_transductive() -> bool:
        return True

    def rectify_prototypes(self, support: SupportSet, query_features: torch.Tensor) -> torch.Tensor:
        ways = support.prototypes.shape[1]
        shifted = query_features + (support.features.mean(1, keepdim=True) - query_features.mean(1, keepdim=True))
        support_one_hot = F.one_hot(support.labels, ways).to(shifted.dtype)
        support_weights = support_one_hot * cosine_scores(support.features, support.prototypes).exp()
        query_similarities = cosine_scores(shifted, support.prototypes)
        query_one_hot = F.one_hot(query_similarities.argmax(-1), ways).to(shifted.dtype)
        query_weights = query_one_hot * query_similarities.exp()
        normalisation = support_weights.sum(1, keepdim=True) + query_weights.sum(1, keepdim=True)  # [B, 1, ways]
        return ((support_weights / normalisation).transpose(1, 2) @ support.features) + (
            (query_weights / normalisation).transpose(1, 2) @ shifted
        )

    def refine(self, support, query_features):
        prototypes = self.rectify_prototypes(support, query_features)
        return prototypes, cosine_scores(query_features, prototypes)


class LaplacianShot(BDCSPN):
    """LaplacianShot (Ziko et al. 2020, "Laplacian Regularized Few-Shot
    Learning", arXiv:2006.15486), as easyfsl: BD-CSPN's rectified prototypes,
    then the bound updates of Algorithm 1, ``Y = softmax(-a + lambda x W Y)``
    with ``a`` the queries' squared distances to the prototypes and ``W`` the
    ``knn``-nearest-neighbour affinity of the queries (each query's ``knn -
    1`` nearest other queries, easyfsl's choice), until the bound (Eq. 7)
    changes by at most 1e-6 of itself (from the third step; at most
    ``inference_steps``). The scores are the assignments ``Y`` (rows summing
    to 1); ``use_softmax`` does not change them."""

    def __init__(self, *args, inference_steps: int = 20, knn: int = 3, lambda_regularization: float = 0.7, **kwargs):
        super().__init__(*args, **kwargs)
        self.inference_steps, self.knn, self.lambda_regularization = inference_steps, knn, lambda_regularization

    def softmax_if_specified(self, scores: torch.Tensor) -> torch.Tensor:
        return scores

    def affinities(self, query_features: torch.Tensor) -> torch.Tensor:
        """``[B, Q, Q]``: 1 where the column's query is among the row's
        ``knn - 1`` nearest other queries, else 0."""
        Q = query_features.shape[1]
        if 0 < Q < self.knn:
            raise ValueError(f"LaplacianShot: knn = {self.knn} needs episodes of at least {self.knn} queries, got {Q}")
        distances = ops.pairwise_distance(query_features, query_features, "sqeuclidean")
        neighbours = distances.topk(min(self.knn, Q), -1, largest=False).indices[..., 1:]
        return torch.zeros_like(distances).scatter_(-1, neighbours, 1.0)

    def bound(self, assignments, distances, affinities):
        """Eq. 7 per episode ``[B]``."""
        pairwise = affinities @ assignments
        return (
            assignments * (assignments + 1e-12).log()
            + distances * assignments
            - self.lambda_regularization * pairwise * assignments
        ).sum((1, 2))

    def refine(self, support, query_features):
        prototypes = self.rectify_prototypes(support, query_features)
        distances = ops.pairwise_distance(query_features, prototypes, "sqeuclidean")
        affinities = self.affinities(query_features)
        previous = torch.full(distances.shape[:1], float("inf"), dtype=distances.dtype, device=distances.device)

        def bound_update(assignments, iteration):
            nonlocal previous
            assignments = (self.lambda_regularization * (affinities @ assignments) - distances).softmax(-1)
            bound = self.bound(assignments, distances, affinities)
            converged = (bound - previous).abs() <= 1e-6 * previous.abs()
            previous = bound
            return assignments, converged & (iteration > 1)

        assignments = update_until_converged(bound_update, (-distances).softmax(-1), self.inference_steps)
        return prototypes, assignments
