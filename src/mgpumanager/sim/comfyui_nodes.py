"""What the fake ComfyUI's ``GET /object_info`` answers: a handful of its core nodes, in the
shape ComfyUI describes every node class (inputs with their types and options, outputs,
category). Clients read it to build or check a workflow; ``LoadImage`` lists the uploaded
inputs, as ComfyUI lists its input folder."""

from __future__ import annotations

from typing import Any


def _node(
    name: str,
    category: str,
    required: dict[str, Any],
    output: list[str],
    output_node: bool = False,
    python_module: str = "nodes",
) -> dict[str, Any]:
    described: dict[str, Any] = {
        "input": {"required": required},
        "input_order": {"required": list(required)},
        "output": output,
        "output_is_list": [False] * len(output),
        "output_name": output,
        "name": name,
        "display_name": name,
        "description": "",
        "python_module": python_module,
        "category": category,
        "output_node": output_node,
    }
    if output:  # ComfyUI lists tooltips only for nodes with outputs
        described["output_tooltips"] = [None] * len(output)
    return described


def object_info(input_images: list[str]) -> dict[str, Any]:
    """A few of ComfyUI's core nodes, described as /object_info does."""
    int_seed = ["INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF}]
    return {
        "CheckpointLoaderSimple": _node(
            "CheckpointLoaderSimple",
            "loaders",
            {"ckpt_name": [["flux1-dev.safetensors", "sd_xl_base_1.0.safetensors"]]},
            ["MODEL", "CLIP", "VAE"],
        ),
        "CLIPTextEncode": _node(
            "CLIPTextEncode",
            "conditioning",
            {"text": ["STRING", {"multiline": True}], "clip": ["CLIP"]},
            ["CONDITIONING"],
        ),
        "EmptyLatentImage": _node(
            "EmptyLatentImage",
            "latent",
            {
                "width": ["INT", {"default": 512, "min": 16, "max": 16384, "step": 8}],
                "height": ["INT", {"default": 512, "min": 16, "max": 16384, "step": 8}],
                "batch_size": ["INT", {"default": 1, "min": 1, "max": 4096}],
            },
            ["LATENT"],
        ),
        "KSampler": _node(
            "KSampler",
            "sampling",
            {
                "model": ["MODEL"],
                "seed": int_seed,
                "steps": ["INT", {"default": 20, "min": 1, "max": 10000}],
                "cfg": ["FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0}],
                "positive": ["CONDITIONING"],
                "negative": ["CONDITIONING"],
                "latent_image": ["LATENT"],
            },
            ["LATENT"],
        ),
        "VAEDecode": _node(
            "VAEDecode", "latent", {"samples": ["LATENT"], "vae": ["VAE"]}, ["IMAGE"]
        ),
        "SaveImage": _node(
            "SaveImage",
            "image",
            {"images": ["IMAGE"], "filename_prefix": ["STRING", {"default": "ComfyUI"}]},
            [],
            output_node=True,
        ),
        "LoadImage": _node(
            "LoadImage",
            "image",
            {"image": [input_images, {"image_upload": True}]},
            ["IMAGE", "MASK"],
        ),
        # Nodes that need no weights: the graph the real-ComfyUI tests run (CPU, no models).
        "EmptyImage": _node(
            "EmptyImage",
            "image",
            {
                "width": ["INT", {"default": 512, "min": 1, "max": 16384, "step": 1}],
                "height": ["INT", {"default": 512, "min": 1, "max": 16384, "step": 1}],
                "batch_size": ["INT", {"default": 1, "min": 1, "max": 4096}],
                "color": ["INT", {"default": 0, "min": 0, "max": 16777215, "step": 1}],
            },
            ["IMAGE"],
        ),
        "ImageBlur": _node(
            "ImageBlur",
            "image/postprocessing",
            {
                "image": ["IMAGE", {}],
                "blur_radius": ["INT", {"default": 1, "min": 1, "max": 31, "step": 1}],
                "sigma": ["FLOAT", {"default": 1.0, "min": 0.1, "max": 10.0, "step": 0.1}],
            },
            ["IMAGE"],
            python_module="comfy_extras.nodes_post_processing",
        ),
        "ImageInvert": _node("ImageInvert", "image", {"image": ["IMAGE"]}, ["IMAGE"]),
        "PreviewImage": _node("PreviewImage", "image", {"images": ["IMAGE"]}, [], True),
    }


def node_classes() -> frozenset[str]:
    """The node classes the fake knows; a prompt with any other is refused, as ComfyUI
    refuses a class it has not loaded."""
    return _CLASSES


_CLASSES = frozenset(object_info([]))
