"""Each meta-learning method as the trainer drives it: a model holding every
trained parameter, the gradients of one meta-batch, and predictions on
held-out episodes."""

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..algorithms import ANIL, BatchedMAML, Reptile, iMAML
from ..data import Episode
from ..nn import (
    MANN,
    Conv4,
    FewShotGNN,
    MatchingNetworks,
    MetaLearnerLSTM,
    MetaNetwork,
    PrototypicalNetworks,
    RelationNetworks,
    ResNet12,
    SiameseNetworks,
)
from .config import Config

__all__ = ["Method", "build_method"]


def backbone(config: Config, channels: int, flatten: bool = True, pooled_blocks: int = 4) -> nn.Module:
    if config.backbone == "resnet12":
        return ResNet12(channels, flatten=flatten)
    return Conv4(channels, pooled_blocks=pooled_blocks, flatten=flatten)


def output_shape(module: nn.Module, image_shape) -> torch.Size:
    """The shape of ``module``'s output for one image (batch norm left as it was)."""
    training = module.training
    module.eval()
    with torch.no_grad():
        shape = module(torch.zeros(1, *image_shape)).shape[1:]
    module.train(training)
    return shape


def batch_statistics_only(module: nn.Module) -> nn.Module:
    """``module`` with every ``BatchNorm2d`` normalising with the statistics
    of its current batch, in training and at test time, without running
    statistics (as MAML's reference implementation does)."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, nn.BatchNorm2d(child.num_features, track_running_stats=False))
        else:
            batch_statistics_only(child)
    return module


def adapted_classifier(config: Config, image_shape) -> nn.Sequential:
    """What the optimisation-based methods adapt: the backbone, normalising
    with batch statistics only, and a linear ``ways``-way classifier."""
    net = batch_statistics_only(backbone(config, image_shape[0]))
    return nn.Sequential(net, nn.Linear(output_shape(net, image_shape)[0], config.ways))


def accuracy(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return (scores.argmax(-1) == labels).float().mean()


class Method:
    """What the trainer needs of a method. ``model`` holds every trained
    parameter and buffer (it is what checkpoints save);
    ``compute_gradients`` adds the gradients of the mean loss over the
    episodes' tasks to ``.grad`` and returns that loss and, where the
    method computes it anyway, the query accuracy; ``predict`` gives each
    query's predicted class."""

    model: nn.Module

    def __init__(self, config: Config, image_shape: Tuple[int, ...]):
        self.config = config

    def optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.model.parameters(), lr=self.config.lr)

    def compute_gradients(self, e: Episode) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        raise NotImplementedError

    def predict(self, e: Episode) -> torch.Tensor:
        raise NotImplementedError


class MetricMethod(Method):
    """Prototypical, Matching, Relation and Siamese networks, few-shot GNNs
    and Meta Networks (fastmeta.nn): each a FewShotClassifier."""

    def __init__(self, config: Config, image_shape):
        super().__init__(config, image_shape)
        channels = image_shape[0]
        if config.method == "relation":
            net = backbone(config, channels, flatten=False, pooled_blocks=2)
            self.model = RelationNetworks(net, feature_dimension=output_shape(net, image_shape)[0])
            return
        net = backbone(config, channels)
        features = output_shape(net, image_shape)[0]
        if config.method == "protonet":
            self.model = PrototypicalNetworks(net, metric="sqeuclidean")
        elif config.method == "matching":
            self.model = MatchingNetworks(net, feature_dimension=features)
        elif config.method == "gnn":
            self.model = FewShotGNN(net, feature_dimension=features, ways=config.ways)
        elif config.method == "metanet":
            self.model = MetaNetwork(net, feature_dimension=features, ways=config.ways)
        else:
            self.model = SiameseNetworks(net, head="koch", feature_dimension=features)

    def compute_gradients(self, e: Episode):
        if isinstance(self.model, SiameseNetworks):  # trained on verification, not on the scores
            loss = self.model.loss(e.support, e.support_labels, e.query, e.query_labels)
            loss.backward()
            return loss.detach(), None
        scores = self.model.score_episodes(e.support, e.support_labels, e.query, self.config.ways)
        loss = self.model.loss_of_scores(scores, e.query_labels)
        loss.backward()
        return loss.detach(), accuracy(scores.detach(), e.query_labels)

    @torch.no_grad()
    def predict(self, e: Episode) -> torch.Tensor:
        ways = e.classes.shape[1]
        return self.model.score_episodes(e.support, e.support_labels, e.query, ways).argmax(-1)


class MAMLMethod(Method):
    """MAML, first-order MAML and Meta-SGD (BatchedMAML), and iMAML, on a
    backbone and a linear classifier, batch norm on each task's batch."""

    def __init__(self, config: Config, image_shape):
        super().__init__(config, image_shape)
        learner = adapted_classifier(config, image_shape)
        if config.method == "imaml":
            self.model = iMAML(
                learner, config.inner_lr, config.inner_steps, config.lam, config.cg_steps, loss="cross_entropy"
            )
            return
        self.model = BatchedMAML(
            learner,
            config.inner_lr,
            config.inner_steps,
            first_order=config.method == "fomaml",
            learn_inner_lr=config.method == "metasgd",
            loss="cross_entropy",
        )

    def compute_gradients(self, e: Episode):
        out = self.model(e.support, e.support_labels, e.query, e.query_labels, return_outputs=True)
        out.loss.backward()
        return out.loss.detach(), out.accuracy

    def predict(self, e: Episode) -> torch.Tensor:
        return self.model.predict(e.support, e.support_labels, e.query, self.config.test_inner_steps).argmax(-1)


class AnilMethod(Method):
    """ANIL (Raghu et al. 2020): the backbone trained by the outer loop
    only, a linear head adapted per task (fused kernels)."""

    def __init__(self, config: Config, image_shape):
        super().__init__(config, image_shape)
        net = batch_statistics_only(backbone(config, image_shape[0]))
        head = nn.Sequential(nn.Linear(output_shape(net, image_shape)[0], config.ways))
        self.model = ANIL(net, head, config.inner_lr, config.inner_steps)

    def compute_gradients(self, e: Episode):
        out = self.model(e.support, e.support_labels, e.query, e.query_labels, return_outputs=True)
        out.loss.backward()
        return out.loss.detach(), out.accuracy

    def predict(self, e: Episode) -> torch.Tensor:
        return self.model.predict(e.support, e.support_labels, e.query, self.config.test_inner_steps).argmax(-1)


class ReptileMethod(Method):
    """Reptile: each task's copy trains on all its examples; the step towards
    their mean is a gradient for SGD with learning rate ``outer_lr``."""

    def __init__(self, config: Config, image_shape):
        super().__init__(config, image_shape)
        learner = adapted_classifier(config, image_shape)
        self.model = Reptile(learner, config.inner_lr, config.inner_steps, config.outer_lr, loss="cross_entropy")

    def optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.model.parameters(), lr=self.config.outer_lr)

    def compute_gradients(self, e: Episode):
        x = torch.cat([e.support, e.query], 1)
        y = torch.cat([e.support_labels, e.query_labels], 1)
        loss = self.model.accumulate_grad(x, y)
        return (loss if loss is not None else torch.zeros(())), None

    def predict(self, e: Episode) -> torch.Tensor:
        return self.model.predict(e.support, e.support_labels, e.query, self.config.test_inner_steps).argmax(-1)


class MetaLstmMethod(Method):
    """Ravi & Larochelle's LSTM meta-learner (fused kernels) adapting a
    backbone and a linear classifier, one task at a time."""

    def __init__(self, config: Config, image_shape):
        super().__init__(config, image_shape)
        self.learner = adapted_classifier(config, image_shape)
        self.model = MetaLearnerLSTM(self.learner)

    def _query_logits(self, e: Episode, task: int, steps: int) -> torch.Tensor:
        params = self.model.adapt(self.learner, e.support[task], e.support_labels[task], F.cross_entropy, steps)
        return torch.func.functional_call(self.learner, params, (e.query[task],))

    def compute_gradients(self, e: Episode):
        tasks = e.support.shape[0]
        total, correct = 0.0, 0.0
        for task in range(tasks):
            logits = self._query_logits(e, task, self.config.inner_steps)
            loss = F.cross_entropy(logits, e.query_labels[task]) / tasks
            loss.backward()
            total += loss.detach()
            correct += accuracy(logits.detach(), e.query_labels[task]) / tasks
        return total, correct

    def predict(self, e: Episode) -> torch.Tensor:
        with torch.enable_grad():  # the learner's gradients are the meta-learner's inputs
            return torch.stack(
                [
                    self._query_logits(e, task, self.config.test_inner_steps).detach()
                    for task in range(e.support.shape[0])
                ]
            ).argmax(-1)


class MannMethod(Method):
    """MANN (Santoro et al.) on episodes as sequences: the support examples
    in random order, each label shown one step late, then the queries, whose
    labels are never shown; trained on every step's prediction, as the
    paper, and evaluated on the queries."""

    def __init__(self, config: Config, image_shape):
        super().__init__(config, image_shape)
        self.model = MANN(int(torch.Size(image_shape).numel()), config.ways)

    def _sequence(self, e: Episode, generator: Optional[torch.Generator] = None):
        order = torch.rand(e.support_labels.shape, device=e.support.device, generator=generator).argsort(1)
        support = e.support.gather(1, order.view(*order.shape, *[1] * (e.support.dim() - 2)).expand_as(e.support))
        labels = e.support_labels.gather(1, order)
        inputs = torch.cat([support, e.query], 1)
        hidden = torch.full_like(e.query_labels, -1)
        return inputs, torch.cat([labels, hidden], 1), torch.cat([labels, e.query_labels], 1)

    def compute_gradients(self, e: Episode):
        inputs, shown, targets = self._sequence(e)
        logits = self.model(inputs, shown)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        loss.backward()
        queries = e.query_labels.shape[1]
        return loss.detach(), accuracy(logits[:, -queries:].detach(), e.query_labels)

    @torch.no_grad()
    def predict(self, e: Episode) -> torch.Tensor:
        # a fixed order of the support examples: evaluation leaves the training RNG alone
        generator = torch.Generator(e.support.device).manual_seed(0)
        inputs, shown, _ = self._sequence(e, generator)
        return self.model(inputs, shown)[:, -e.query.shape[1] :].argmax(-1)


METHOD_CLASSES = {
    "protonet": MetricMethod,
    "matching": MetricMethod,
    "relation": MetricMethod,
    "siamese": MetricMethod,
    "maml": MAMLMethod,
    "fomaml": MAMLMethod,
    "metasgd": MAMLMethod,
    "imaml": MAMLMethod,
    "anil": AnilMethod,
    "reptile": ReptileMethod,
    "meta-lstm": MetaLstmMethod,
    "mann": MannMethod,
    "gnn": MetricMethod,
    "metanet": MetricMethod,
}


def build_method(config: Config, image_shape) -> Method:
    method = METHOD_CLASSES[config.method](config, tuple(image_shape))
    method.model.to(config.device)
    return method
