"""The ``digits_mlp`` model: a 64-384-192-10 ReLU classifier whose fully connected layers are
named ``fc1``, ``fc2``, ``fc3`` (so ``fc1.weight``, 384 x 64, Q = 6, is what the config's
regularizer regex selects; ``fc2.weight``, 192 x 384, Q = 2, carries no penalty)."""
from typing import Dict, Optional

import torch
from allennlp.data import Vocabulary
from allennlp.models import Model
from allennlp.nn import RegularizerApplicator
from allennlp.training.metrics import CategoricalAccuracy


@Model.register("digits_mlp")
class DigitsMLP(Model):
    def __init__(self, vocab: Vocabulary, input_dim: int = 64, hidden1: int = 384,
                 hidden2: int = 192, num_classes: int = 10,
                 regularizer: Optional[RegularizerApplicator] = None) -> None:
        super().__init__(vocab, regularizer=regularizer)
        self.fc1 = torch.nn.Linear(input_dim, hidden1)
        self.fc2 = torch.nn.Linear(hidden1, hidden2)
        self.fc3 = torch.nn.Linear(hidden2, num_classes)
        self.accuracy = CategoricalAccuracy()

    def forward(self, pixels: torch.Tensor,  # type: ignore
                label: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        h = torch.relu(self.fc1(pixels))
        h = torch.relu(self.fc2(h))
        logits = self.fc3(h)
        output = {"logits": logits, "probs": torch.softmax(logits, dim=-1)}
        if label is not None:
            output["loss"] = torch.nn.functional.cross_entropy(logits, label)
            self.accuracy(logits, label)
        return output

    def get_metrics(self, reset: bool = False) -> Dict[str, float]:
        return {"accuracy": self.accuracy.get_metric(reset)}
