"""`evaluate_run(workdir)`: restore a run's EMA parameters and write workdir/eval/:
metrics.json, per_timestep.png, samples.png, reverse_process.png and report.md."""
from __future__ import annotations

import functools
import json
import logging
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.errors import UsageError
from diffusion_jax import latents, viz
from diffusion_jax.data import load_split
from diffusion_jax.builders import denoise_fn_for, precondition_of
from diffusion_jax.evaluation.frechet import feature_statistics, frechet_distance, load_statistics
from diffusion_jax.evaluation.metrics import prediction_metrics
from diffusion_jax.conditions import broadcast_condition, condition_kind, describe_guidance, guidance_enabled
from diffusion_jax.config import sampler_settings
from diffusion_jax.generation import make_generator
from diffusion_jax.likelihood import discrete_schedule, nll_bpd
from diffusion_jax.ode_likelihood import ode_nll_bpd
from diffusion_jax.processes import as_process
from diffusion_jax.runs import load_run

log = logging.getLogger(__name__)


def ode_bits_per_dim(denoise_fn, process, x0, *, key, prediction, batch_size=64, num_steps=64) -> dict:
    """Mean bits/dim over x0 [N, ...] of the probability-flow ODE likelihood (Hutchinson's
    divergence, dequantised: `ode_likelihood.ode_nll_bpd`)."""
    fn = jax.jit(lambda x, k: ode_nll_bpd(denoise_fn, process, x, k, prediction=prediction, num_steps=num_steps,
                                          divergence="hutchinson"))
    process = as_process(process)
    name = process.name
    if discrete_schedule(process) is not None:  # taken in continuous time
        name += " (in continuous time: log-SNR linear between the schedule's steps)"
    values = [np.asarray(fn(jnp.asarray(x0[start:start + batch_size]), jax.random.fold_in(key, i)))
              for i, start in enumerate(range(0, len(x0), batch_size))]
    return {"total_bpd": float(np.concatenate(values).mean()), "num_images": int(len(x0)),
            "likelihood": f"probability-flow ODE of the {name} process (RK4, {num_steps} steps, "
                          "Hutchinson divergence, dequantised)"}


def bits_per_dim(denoise_fn, schedule, x0, *, key, prediction, variance, batch_size=64) -> dict:
    """Mean VLB in bits/dim over x0 [N, ...] with its terms (prior, KL sum, decoder)."""
    fn = jax.jit(lambda x, k: nll_bpd(denoise_fn, schedule, x, k, prediction=prediction,
                                      variance=variance))
    totals = {"total_bpd": [], "prior_bpd": [], "kl_bpd": [], "decoder_bpd": []}
    for i, start in enumerate(range(0, len(x0), batch_size)):
        out = fn(jnp.asarray(x0[start:start + batch_size]), jax.random.fold_in(key, i))
        for k in totals:
            totals[k].append(np.asarray(out[k]))
    return {k: float(np.concatenate(v).mean()) for k, v in totals.items()} | {"num_images": int(len(x0))}


FEW_STEP = ("meanflow", "consistency", "lcm")  # samplers of one-or-few-step generators: FD reported at 1, 2, 4 steps
FEW_STEP_EVALUATIONS = (1, 2, 4)


def evaluate_run(workdir, *, checkpoint: int | None = None, num_samples: int | None = None,
                 sampler: str | None = None, steps: int | None = None, seed: int | None = None,
                 fid_stats: str | None = None, inception_weights: str | None = None,
                 out_dir=None, sampler_options: dict | None = None, guidance_scale: float | None = None) -> dict:
    """Evaluates the run in `workdir`; returns the metrics dict it writes to eval/metrics.json.
    Samples are drawn at `guidance_scale` (default: the run's sample.guidance_scale).

    With `fid_stats` (a reference .npz from `fid-stats`) the FID of the samples is computed with
    the FID Inception network (`inception_weights`, default path in evaluation/inception.py).
    """
    started = time.perf_counter()
    run = load_run(workdir, checkpoint)
    c = run.config
    bound = discrete_schedule(run.schedule)  # the variational bound's, where the process has one
    seed = c.eval.seed if seed is None else seed
    num_samples = c.eval.num_samples if num_samples is None else num_samples
    if num_samples < 1:
        raise UsageError(f"the number of samples to evaluate must be at least 1, got {num_samples}")
    # checked before the metrics take their time
    method, num_steps, options = sampler_settings(c, run.schedule, sampler, steps, sampler_options)
    guidance_scale = float(c.sample.guidance_scale if guidance_scale is None else guidance_scale)
    guidance_enabled(c, guidance_scale)  # an unconditional run refuses a scale
    fid_stats = fid_stats or c.eval.get("fid_stats", "")
    if fid_stats:  # the reference and the network are read first: a missing file fails fast
        from diffusion_jax.evaluation.inception import inception_features, load_inception

        reference = load_statistics(fid_stats)
        inception = load_inception(inception_weights)
    out = pathlib.Path(out_dir or pathlib.Path(workdir) / "eval")
    out.mkdir(parents=True, exist_ok=True)
    held_out = load_split(c.data, c.data.eval_split)
    held_out_images = held_out.model_range()
    # The held-out metrics are the unconditional model's: a conditional one given its null condition.
    kind = condition_kind(c)
    denoise = denoise_fn_for(run.model, run.ema_params, kind is not None, sigma_data=precondition_of(c))
    if kind is not None:
        null = kind.null(c, None, run.condition_adapters) if run.condition_adapters else kind.null(c)
        conditioned = denoise
        denoise = lambda x, t: conditioned(x, t, broadcast_condition(null, x.shape[0]))

    model_inputs = held_out_images
    if latents.vae_source(c):  # the backbone's held-out inputs are the latents of the images
        vae = latents.load_vae(latents.vae_source(c))
        model_inputs = latents.encode_images(vae, held_out_images[: c.eval.num_examples], jax.random.PRNGKey(seed))
    metrics = prediction_metrics(denoise, run.schedule, model_inputs, num_examples=c.eval.num_examples, seed=seed,
                                 prediction=c.diffusion.prediction)
    bpd_images = held_out_images[: c.eval.bpd_examples]
    if len(bpd_images) and latents.vae_source(c):
        log.info("bits/dim skipped: the VLB of a latent model bounds the latents' likelihood, not the images'")
    elif len(bpd_images) and bound is None:
        metrics["bpd"] = ode_bits_per_dim(denoise, run.schedule, bpd_images, key=jax.random.PRNGKey(seed),
                                          prediction=c.diffusion.prediction)
    elif len(bpd_images):
        metrics["bpd"] = bits_per_dim(denoise, bound, bpd_images, key=jax.random.PRNGKey(seed),
                                      prediction=c.diffusion.prediction, variance=c.diffusion.variance)
        if c.eval.get("ode_bpd", True):  # the exact likelihood of its continuous-time view, beside the bound
            metrics["bpd_ode"] = ode_bits_per_dim(denoise, run.schedule, bpd_images, key=jax.random.PRNGKey(seed),
                                                  prediction=c.diffusion.prediction)

    generate = make_generator(run.model, run.schedule, c, batch_size=min(num_samples, 256),
                              method=method, steps=num_steps, options=options,
                              trajectory_every=max(1, num_steps // 10), condition_adapters=run.condition_adapters)
    generate = functools.partial(generate, guidance_scale=guidance_scale)
    samples, trajectory = generate(run.ema_params, num_samples, jax.random.PRNGKey(seed))
    metrics["sampler"] = {"method": method, "steps": int(num_steps), "eta": options.get("eta"),
                          "options": options,
                          "guidance_scale": guidance_scale,
                          "guidance": describe_guidance(c, guidance_scale),
                          "num_samples": int(num_samples)}
    if c.data.name == "digits":
        from diffusion_jax.evaluation.digits_features import digits_features, digits_predict

        real = feature_statistics(digits_features(held_out_images))  # once, for every FD below
        fd = frechet_distance(*feature_statistics(digits_features(samples)), *real)
        classes, confidence = digits_predict(samples)
        metrics["digits_fd"] = fd
        metrics["digits_classifier_confidence"] = float(confidence.mean())
        metrics["digits_class_histogram"] = np.bincount(classes, minlength=10).tolist()
        if method in FEW_STEP:  # a few-step generator: its FD at 1, 2 and 4 model evaluations
            by_steps = {}
            for k in FEW_STEP_EVALUATIONS:
                if k == num_steps:  # the samples above
                    by_steps[str(k)] = fd
                    continue
                images = make_generator(run.model, run.schedule, c, batch_size=min(num_samples, 256), method=method,
                                        steps=k, options=options, condition_adapters=run.condition_adapters)(
                    run.ema_params, num_samples, jax.random.PRNGKey(seed), guidance_scale=guidance_scale)
                by_steps[str(k)] = frechet_distance(*feature_statistics(digits_features(images)), *real)
            metrics["digits_fd_by_steps"] = by_steps
    if kind is not None and kind.name == "text" and c.data.name == "digits":  # does the prompt say which digit? a grid per prompt
        metrics["prompts"] = digit_prompt_adherence(generate, run.ema_params, jax.random.PRNGKey(seed + 1),
                                                    out / "samples_per_prompt.png")
    if fid_stats:
        features = inception_features(inception, samples)
        metrics["fid"] = frechet_distance(*feature_statistics(features), *reference)
        metrics["fid_reference"] = str(fid_stats)
    metrics.update(checkpoint_step=int(run.step), seed=int(seed), workdir=str(workdir),
                   ema=True, seconds=round(time.perf_counter() - started, 1))

    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    viz.save_grid(samples, out / "samples.png")
    viz.save_reverse_process(trajectory, out / "reverse_process.png")
    per_t = [r for r in metrics["per_timestep"] if r["count"]]
    centers = [(r["t_min"] + r["t_max"]) / 2 for r in per_t]
    viz.save_metric_plot(centers, {name: [r[name] for r in per_t] for name in ("mse", "mae", "r2")},
                         out / "per_timestep.png", title=f"held-out noise prediction, step {run.step}")
    (out / "report.md").write_text(render_report(metrics))
    np.savez_compressed(out / "samples.npz", samples=samples)
    return metrics


DIGIT_PROMPTS = tuple(f"a handwritten {d}" for d in range(10))


def digit_prompt_adherence(generate, params, key, path, per_prompt: int = 16) -> dict:
    """Samples for "a handwritten 0" .. "a handwritten 9" (a row each, saved as one grid at
    `path`) and the fraction the digits classifier reads as the digit asked for."""
    from diffusion_jax.evaluation.digits_features import digits_predict

    images = generate(params, 10 * per_prompt, key, prompts=list(DIGIT_PROMPTS))[0]  # sample i: digit i % 10
    asked = np.arange(len(images)) % 10
    classes, _ = digits_predict(images)
    viz.save_grid(images[np.argsort(asked, kind="stable")], path, ncols=per_prompt)
    return {"prompts": list(DIGIT_PROMPTS), "per_prompt": per_prompt,
            "accuracy": float(np.mean(classes == asked)),
            "accuracy_per_prompt": [float(np.mean(classes[asked == d] == d)) for d in range(10)]}


def render_report(m: dict) -> str:
    s = m["sampler"]
    lines = [
        "# Evaluation report", "",
        f"Checkpoint step {m['checkpoint_step']} (EMA parameters) of `{m['workdir']}`, seed {m['seed']}.", "",
        "## Noise prediction on the held-out split",
        f"{m['num_examples']} fixed (x0, t, noise) triples, t spread evenly over [0, T).", "",
        "| metric | value |", "|---|---|",
        f"| MSE | {m['noise_mse']:.5f} |", f"| RMSE | {m['noise_rmse']:.5f} |",
        f"| MAE | {m['noise_mae']:.5f} |", f"| R² | {m['noise_r2']:.4f} |", "",
    ]
    if m.get("target", "eps") != "eps":  # the eps the output implies above, the model's own target here
        lines += [f"Process `{m['process']}`; times spread evenly over its range (sigma log-uniform for edm). "
                  f"The model's own target (`{m['target']}`): MSE {m['target_mse']:.5f}, RMSE {m['target_rmse']:.5f}, "
                  f"MAE {m['target_mae']:.5f}, R² {m['target_r2']:.4f}.", ""]
    lines += ["| t range | MSE | MAE | R² |", "|---|---|---|---|"]
    for r in m["per_timestep"]:
        if r["count"]:
            lines.append(f"| {r['t_min']:g}–{r['t_max']:g} | {r['mse']:.5f} | {r['mae']:.5f} | {r['r2']:.4f} |")
    if "bpd" in m and "likelihood" not in m["bpd"]:
        b = m["bpd"]
        lines += ["", "## Likelihood (variational bound)",
                  f"{b['total_bpd']:.4f} bits/dim over {b['num_images']} held-out images "
                  f"(prior {b['prior_bpd']:.5f}, KL terms {b['kl_bpd']:.4f}, decoder {b['decoder_bpd']:.4f})."]
    for b in (m.get("bpd", {}), m.get("bpd_ode", {})):
        if "likelihood" in b:
            lines += ["", "## Likelihood (exact, of the probability-flow ODE)",
                      f"{b['total_bpd']:.4f} bits/dim over {b['num_images']} held-out images: {b['likelihood']}."]
    lines += ["", "## Samples",
              f"{s['num_samples']} samples, sampler `{s['method']}` with {s['steps']} steps"
              f"{'' if s['eta'] is None else ', eta ' + str(s['eta'])}, "
              f"{s['guidance']}.", ""]
    if "fid" in m:
        lines += [f"FID {m['fid']:.3f} against `{m['fid_reference']}` ({s['num_samples']} samples, "
                  "uint8-rounded, FID Inception pool3).", ""]
    if "digits_fd" in m:
        lines += [f"Frechet distance in digits-classifier features (lower is better): {m['digits_fd']:.3f}; "
                  f"mean classifier confidence on samples {m['digits_classifier_confidence']:.3f}; "
                  f"classes {m['digits_class_histogram']}.", ""]
    if "digits_fd_by_steps" in m:
        lines += ["Frechet distance by steps (one model evaluation each): " + ", ".join(
            f"{k}: {v:.3f}" for k, v in m["digits_fd_by_steps"].items()) + ".", ""]
    if "prompts" in m:
        p = m["prompts"]
        lines += [f"Prompts: {p['per_prompt']} samples for each of \"a handwritten 0\" .. \"a handwritten 9\" "
                  f"(a row each); the digits classifier reads the digit asked for in {p['accuracy']:.1%} of them "
                  f"(per prompt: {', '.join(f'{a:.0%}' for a in p['accuracy_per_prompt'])}).", "",
                  "![samples per prompt](samples_per_prompt.png)", ""]
    lines += ["![samples](samples.png)", "", "Reverse process (rows: x_t, then predicted x0):", "",
              "![reverse process](reverse_process.png)", "", "![per-timestep metrics](per_timestep.png)", ""]
    return "\n".join(lines)
