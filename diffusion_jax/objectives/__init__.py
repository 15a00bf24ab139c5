"""Training objectives beside the denoising loss (`losses.training_loss`), each in its own module:
MeanFlow's average-velocity loss (`meanflow`) and continuous-time consistency training
(`consistency`). Each takes (model_fn, process, x0, key, prediction=..., **options) and returns
(loss, aux) as the denoising loss does; `objective_options` checks a run's options."""
from diffusion_jax.numeric_options import checked_options
from diffusion_jax.objectives import consistency, meanflow
from diffusion_jax.objectives.consistency import consistency_loss
from diffusion_jax.objectives.meanflow import Unconditional, folds_guidance, meanflow_loss

OBJECTIVES = {"meanflow": meanflow_loss, "consistency": consistency_loss}
OPTIONS = {"meanflow": meanflow.OPTIONS, "consistency": consistency.OPTIONS}  # {option: (default, low, high)}
FORWARD_MODE = ("meanflow", "consistency")  # objectives that differentiate the model with jax.jvp
TWO_TIME = ("meanflow",)  # objectives of a two-time model (model.second_time) of the average velocity
GUIDED = ("meanflow",)  # objectives that can fold classifier-free guidance into their target (`Unconditional`)


def objective_options(objective: str, options: dict) -> dict:
    """The objective's options, defaults filled in, each a finite number in its range."""
    return checked_options(f"objective {objective!r}", OPTIONS[objective], options)


__all__ = ["FORWARD_MODE", "GUIDED", "OBJECTIVES", "TWO_TIME", "Unconditional", "consistency_loss", "folds_guidance",
           "meanflow_loss", "objective_options"]
