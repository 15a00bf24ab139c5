"""Independent oracles shared by the tests: float64 NumPy formulas and the Gaussian data set
whose optimal denoiser is known in closed form."""
import jax
import numpy as np
import jax.numpy as jnp
from scipy.stats import norm


def gaussian_optimal_eps(alphas_cumprod, mu, sigma):
    """E[eps | x_t] for data x0 ~ N(mu, sigma^2 I), as denoise_fn(x_t, t_model).

    x_t = sqrt(a) x0 + sqrt(1-a) eps is Gaussian with mean sqrt(a) mu and variance
    a sigma^2 + 1 - a, and Cov(eps, x_t) = sqrt(1-a), so the regression of eps on x_t is
    sqrt(1-a) / (a sigma^2 + 1 - a) * (x_t - sqrt(a) mu). `alphas_cumprod` is indexed by the
    model's own timestep (the original schedule's, even when sampling a respaced one).
    """
    abar = jnp.asarray(np.asarray(alphas_cumprod, np.float64), jnp.float32)

    def denoise_fn(x_t, t_model, *unused):
        a = abar[jnp.round(jnp.asarray(t_model)).astype(jnp.int32)].reshape((-1,) + (1,) * (x_t.ndim - 1))
        return jnp.sqrt(1 - a) / (a * sigma**2 + 1 - a) * (x_t - jnp.sqrt(a) * mu)

    return denoise_fn


def gaussian_optimal_loss(alphas_cumprod, sigma):
    """Expected eps-MSE of the optimal predictor, t uniform: mean_t a s^2 / (a s^2 + 1 - a)."""
    a = np.asarray(alphas_cumprod, np.float64)
    return float(np.mean(a * sigma**2 / (a * sigma**2 + 1 - a)))


def discretized_gaussian_entropy_bits(mu, sigma):
    """Entropy (bits per dimension) of round-to-8-bit(N(mu, sigma^2)) on [-1, 1], edge bins
    collecting the tails: the lowest achievable cross-entropy of that data."""
    centers = np.arange(256) / 127.5 - 1.0
    upper = np.append(centers[:-1] + 1 / 255.0, np.inf)
    lower = np.append(-np.inf, centers[1:] - 1 / 255.0)
    p = norm.cdf(upper, mu, sigma) - norm.cdf(lower, mu, sigma)
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


def quantize_8bit(x):
    """Round data in [-1, 1] to the 256 levels k / 127.5 - 1."""
    return np.round((np.clip(x, -1, 1) + 1) * 127.5) / 127.5 - 1


def gaussian_optimal_learned_range(alphas_cumprod, mu, sigma):
    """The exact reverse kernel q(x_{t-1} | x_t) of Gaussian data as a learned_range model.

    Its mean is the posterior mean at E[x0 | x_t] (which the optimal eps gives) and its variance
    beta tilde_t + coef1_t^2 Var(x0 | x_t), Var(x0 | x_t) = s^2 (1-a) / (a s^2 + 1 - a); this lies
    in [beta tilde_t, beta_t] for s <= 1, so the learned-range output v reaches it exactly.
    Returns denoise_fn(x_t, t_model) -> [..., 2C].
    """
    a = np.asarray(alphas_cumprod, np.float64)
    a_prev = np.append(1.0, a[:-1])
    betas = 1 - a / a_prev
    beta_tilde = betas * (1 - a_prev) / (1 - a)
    coef1 = betas * np.sqrt(a_prev) / (1 - a)
    true_var = beta_tilde + coef1**2 * sigma**2 * (1 - a) / (a * sigma**2 + 1 - a)
    log_min = np.log(np.append(beta_tilde[1], beta_tilde[1:]))
    v = 2 * (np.log(true_var) - log_min) / (np.log(betas) - log_min) - 1
    v[0] = -1.0  # the decoder's variance: beta tilde_1 (its log_min)
    v = jnp.asarray(np.clip(v, -1, 1), jnp.float32)
    eps_fn = gaussian_optimal_eps(alphas_cumprod, mu, sigma)

    def denoise_fn(x_t, t_model, *unused):
        v_t = jnp.broadcast_to(v[jnp.round(jnp.asarray(t_model)).astype(jnp.int32)].reshape((-1,) + (1,) * (x_t.ndim - 1)), x_t.shape)
        return jnp.concatenate([eps_fn(x_t, t_model), v_t], axis=-1)

    return denoise_fn


def _gaussian_chain(abars, mu, sigma, deterministic):
    """Float64 scalar recursion of a reverse chain on N(mu, sigma^2) data with the optimal eps.

    `abars` are abar at the chain's timesteps in sampling order (noisiest first); after the
    last one abar_prev = 1. Every step is affine in x plus Gaussian noise, so the chain maps
    x_T to A x_T + B + noise of variance V. DDPM (Ho et al. eqs. 6-7, sigma^2 = beta tilde) or
    DDIM eta = 0 (Song et al. eq. 12), written from the papers, not from the library.
    """
    A, B, V = 1.0, 0.0, 0.0
    for i, a in enumerate(abars):
        ap = abars[i + 1] if i + 1 < len(abars) else 1.0
        c = np.sqrt(1 - a) / (a * sigma**2 + 1 - a)  # eps_hat = c (x - sqrt(a) mu)
        p, q = (1 - np.sqrt(1 - a) * c) / np.sqrt(a), np.sqrt(1 - a) * c * mu  # x0_hat = p x + q
        if deterministic:
            a_x, b = np.sqrt(ap) * p + np.sqrt(1 - ap) * c, np.sqrt(ap) * q - np.sqrt(1 - ap) * c * np.sqrt(a) * mu
            noise_var = 0.0
        else:
            beta = 1 - a / ap
            k1, k2 = np.sqrt(ap) * beta / (1 - a), np.sqrt(a / ap) * (1 - ap) / (1 - a)
            a_x, b = k1 * p + k2, k1 * q
            noise_var = beta * (1 - ap) / (1 - a)
        A, B, V = a_x * A, a_x * B + b, a_x**2 * V + noise_var
    return A, B, V


def ddpm_chain_moments(abars, mu, sigma):
    """Mean and variance of the DDPM (fixed_small) chain's output from x_T ~ N(0, 1)."""
    A, B, V = _gaussian_chain(abars, mu, sigma, deterministic=False)
    return B, A**2 + V


def ddim_chain_map(abars, mu, sigma):
    """(A, B): deterministic DDIM maps x_T to A x_T + B."""
    A, B, _ = _gaussian_chain(abars, mu, sigma, deterministic=True)
    return A, B


def flow_map(abar_T, mu, sigma):
    """(A, B) of the exact probability-flow ODE from abar_T to 0: the standardised x_T
    becomes the standardised x0, x0 = mu + sigma (x_T - sqrt(a) mu) / sqrt(a s^2 + 1 - a)."""
    scale = sigma / np.sqrt(abar_T * sigma**2 + 1 - abar_T)
    return scale, mu - scale * np.sqrt(abar_T) * mu


def gaussian_optimal_continuous(alphas_cumprod, mu, sigma, prediction="eps"):
    """E[eps | x_t] (or E[v | x_t]) of data N(mu, sigma^2 I) at a fractional model timestep t:
    the noise level sigma(t) = exp(interp(t, log sigma_k)), linear in log sigma between the
    integer timesteps as the sigma-space samplers assume, abar(t) = 1 / (1 + sigma(t)^2).
    abar = 0 (zero terminal SNR) is held at 2^-24, as the samplers do."""
    a = np.maximum(np.asarray(alphas_cumprod, np.float64), 2.0 ** -24)
    log_sigmas = jnp.asarray(0.5 * (np.log1p(-a) - np.log(a)), jnp.float32)
    steps = jnp.arange(len(a), dtype=jnp.float32)

    def denoise_fn(x_t, t_model, *unused):
        log_s = jnp.interp(jnp.asarray(t_model, jnp.float32), steps, log_sigmas)
        ab = (1.0 / (1.0 + jnp.exp(2 * log_s))).reshape((-1,) + (1,) * (x_t.ndim - 1))
        eps = jnp.sqrt(1 - ab) / (ab * sigma**2 + 1 - ab) * (x_t - jnp.sqrt(ab) * mu)
        if prediction == "eps":
            return eps
        x0 = (ab * sigma**2 * x_t / jnp.sqrt(ab) + (1 - ab) * mu) / (ab * sigma**2 + 1 - ab)
        return jnp.sqrt(ab) * eps - jnp.sqrt(1 - ab) * x0

    return denoise_fn


# ---------------------------------------------------------------------------- any process
# model time -> time of the processes at their defaults (vp sees 999 t, edm sigma, flow 1000 t, ddpm its index)
PROCESS_TIME_OF = {"vp": lambda m: m / 999.0, "edm": lambda m: m, "flow": lambda m: m / 1000.0,
                   "ddpm": lambda m: m}


def process_coefficients64(name, t):
    """(alpha, sigma, alpha', sigma') in float64 of the processes at their defaults, written out
    from their definitions (vp: score_sde's linear beta 0.1 .. 20; edm: alpha = 1, sigma = t;
    flow: alpha = 1 - t, sigma = t; ddpm: the linear 1000-step schedule, log-SNR linear between
    its integer steps)."""
    t = np.asarray(t, np.float64)
    if name == "vp":
        a = np.exp(-0.25 * t ** 2 * 19.9 - 0.05 * t)
        da = a * (-0.5 * t * 19.9 - 0.05)
        s = np.sqrt(1 - a ** 2)
        return a, s, da, -a * da / np.maximum(s, 1e-300)
    if name == "edm":
        return np.ones_like(t), t, np.zeros_like(t), np.ones_like(t)
    if name == "ddpm":
        abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
        log_snr = np.interp(t, np.arange(1000), np.log(abar) - np.log1p(-abar))
        a, s = np.sqrt(1 / (1 + np.exp(-log_snr))), np.sqrt(1 / (1 + np.exp(log_snr)))
        return a, s, np.full_like(t, np.nan), np.full_like(t, np.nan)
    return 1 - t, t, -np.ones_like(t), np.ones_like(t)


def gaussian_exact_process_model(process, prediction, mu, sigma):
    """model(x_t [B, ...], model_time [B]) -> E[target | x_t] for data x0 ~ N(mu, sigma^2) in every
    dimension: x0_hat = mu + alpha sigma^2 / (alpha^2 sigma^2 + s^2) (x_t - alpha mu), its eps, and
    the target of `prediction` from them (linear in both, so the conditional mean)."""
    from diffusion_jax.processes.targets import levels, prediction_target

    time_of = PROCESS_TIME_OF[process.name]

    def model(x, model_time, *unused):
        t = time_of(jnp.asarray(model_time, jnp.float32))
        lv = levels(process, t, x, derivatives=prediction == "velocity")
        a, s = lv.alpha, lv.sigma
        x0 = mu + a * sigma ** 2 / (a ** 2 * sigma ** 2 + s ** 2) * (x - a * mu)
        return prediction_target(prediction, lv, x0, (x - a * x0) / s)

    return model


def gaussian_average_velocity(mu, s):
    """u(z, r, t) of data N(mu, s^2) on the flow path z_t = (1 - t) x0 + t eps: the exact ODE map
    z_r = m_r + (sd_r / sd_t)(z - m_t) (m_t = (1 - t) mu, sd_t^2 = (1 - t)^2 s^2 + t^2; a Gaussian's
    flow keeps its standardised coordinate) makes u = (z - z_r) / (t - r) affine in z; with
    sd_t^2 - sd_r^2 = (t - r)((t + r) - s^2 (2 - t - r)) it is, without dividing by t - r,
    u = -mu + ((t + r) - s^2 (2 - t - r)) / (sd_t + sd_r) (z - m_t) / sd_t; at r = t the velocity.
    Times in [0, 1], float32 (jax) or float64 (NumPy) as given."""
    def u(z, r, t):
        xp = jnp if isinstance(z, jax.Array) or isinstance(t, jax.Array) else np
        sd = lambda time: xp.sqrt((1 - time) ** 2 * s ** 2 + time ** 2)
        return -mu + ((t + r) - s ** 2 * (2 - t - r)) / (sd(t) + sd(r)) * (z - (1 - t) * mu) / sd(t)
    return u


def gaussian_average_velocity_model(process, mu, s):
    """model(z [B, ...], model_time [B], r=model time [B]) -> the average velocity between times r < t
    of data N(mu, s^2) on any continuous process: (z - z_r) / (t - r), z_r the exact ODE map
    a_r mu + (sd_r / sd_t)(z - a_t mu), sd^2 = a^2 s^2 + sigma^2 (what the meanflow sampler jumps
    with; `gaussian_average_velocity` is the flow path's form that r = t also allows)."""
    time_of = PROCESS_TIME_OF[process.name]

    def model(z, model_time, r):
        shape = (-1,) + (1,) * (z.ndim - 1)
        t, r = (time_of(jnp.asarray(m, jnp.float32)).reshape(shape) for m in (model_time, r))
        (a, sigma), (a_r, sigma_r) = process.marginal(t), process.marginal(r)
        sd, sd_r = jnp.sqrt(a ** 2 * s ** 2 + sigma ** 2), jnp.sqrt(a_r ** 2 * s ** 2 + sigma_r ** 2)
        return (z - a_r * mu - sd_r / sd * (z - a * mu)) / (t - r)

    return model


def gaussian_consistency_model(process, mu, s):
    """model(x_t [B, ...], model_time [B]) -> the consistency function of data N(mu, s^2), the exact
    ODE map to t = 0, mu + s (x_t - a mu) / sqrt(a^2 s^2 + sigma^2), as an x0 prediction (it is not
    E[x0 | x_t]: the ODE keeps each sample's standardised coordinate)."""
    time_of = PROCESS_TIME_OF[process.name]

    def model(x, model_time, *unused):
        t = time_of(jnp.asarray(model_time, jnp.float32)).reshape((-1,) + (1,) * (x.ndim - 1))
        a, sigma = process.marginal(t)
        return mu + s * (x - a * mu) / jnp.sqrt(a ** 2 * s ** 2 + sigma ** 2)

    return model
