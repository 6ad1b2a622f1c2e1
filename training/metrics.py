"""Classification metrics through the `evaluate` library's API, offline.

`evaluate.load("accuracy")` downloads a metric script from the Hugging Face Hub, which fails
without network. The same computation, declared as an `evaluate.Metric` here, works anywhere:

    metric = ClassificationMetrics()
    metric.compute(predictions=[1, 0, 1], references=[1, 1, 1], num_labels=2)
    # {'accuracy': 0.667, 'f1': 0.8, 'precision': 1.0, 'recall': 0.667}
"""

import datasets
import evaluate
import torch
from sklearn.metrics import accuracy_score, precision_recall_fscore_support


class ClassificationMetrics(evaluate.Metric):
    """Accuracy, F1, precision and recall of predicted class ids against true ones.

    Two classes: scores of the positive class (id 1), as evaluate's f1/precision/recall report by
    default. More classes: the unweighted mean over classes ("macro"), so a rare class counts fully.
    """

    def _info(self):
        return evaluate.MetricInfo(
            description="Accuracy, F1, precision and recall for single-label classification.",
            citation="",
            inputs_description="predictions and references: lists of class ids.",
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, num_labels=2):
        average = "binary" if num_labels == 2 else "macro"
        precision, recall, f1, _ = precision_recall_fscore_support(
            references, predictions, average=average, labels=list(range(num_labels)), zero_division=0
        )
        return {
            "accuracy": float(accuracy_score(references, predictions)),
            "f1": float(f1),
            "precision": float(precision),
            "recall": float(recall),
        }


def evaluation_scores(predictions, references, num_labels):
    """eval_accuracy, eval_f1, eval_precision, eval_recall of two tensors of class ids, as Trainer names them."""
    scores = ClassificationMetrics(keep_in_memory=True).compute(
        predictions=predictions.tolist(), references=references.tolist(), num_labels=num_labels
    )
    return {f"eval_{name}": value for name, value in scores.items()}


def confusion_matrix(predictions, references, num_labels):
    """Counts as lists: rows the true class, columns the predicted one."""
    confusion = torch.zeros(num_labels, num_labels, dtype=torch.long)
    confusion.index_put_((references, predictions), torch.ones_like(references), accumulate=True)
    return confusion.tolist()
