"""Plain PyTorch training and evaluation of sequence classifiers, independent of Flower."""

from otfuse.training.evaluation import evaluate_model, predict_proba
from otfuse.training.loop import train_model

__all__ = ["evaluate_model", "predict_proba", "train_model"]
