"""The MNIST recipe on Fashion-MNIST, class-conditional with classifier-free guidance.

    python -m experiments.fashion_mnist_unet --workdir runs/fashion
"""
from experiments.mnist_unet import get_config as mnist_config


def get_config():
    c = mnist_config()
    c.data.name = "fashion_mnist"
    c.data.random_flip = True
    c.data.use_labels, c.data.num_classes = True, 10
    c.train.label_dropout = 0.1
    c.sample.guidance_scale = 2.0
    return c


if __name__ == "__main__":
    from experiments.launch import run

    run(get_config)
