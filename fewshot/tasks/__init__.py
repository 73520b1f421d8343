"""Tasks, meta-batches and task families (samplers)."""

from ._base import LabeledSet, Task, TaskBatch, TaskSampler, as_task_batch, check_generator
from ._labeled import LabeledTasks
from ._synthetic import GaussianClusterTasks, LinearRegressionTasks, SinusoidTasks

__all__ = [
    "LabeledSet",
    "Task",
    "TaskBatch",
    "TaskSampler",
    "as_task_batch",
    "check_generator",
    "SinusoidTasks",
    "LinearRegressionTasks",
    "GaussianClusterTasks",
    "LabeledTasks",
]
