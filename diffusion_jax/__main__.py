from diffusion_jax.cli import main

main()
