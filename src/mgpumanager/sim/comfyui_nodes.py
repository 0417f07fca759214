"""What the fake ComfyUI's ``GET /object_info`` answers: a handful of its core nodes, in the
shape ComfyUI describes every node class (inputs with their types and options, outputs,
category). Clients read it to build or check a workflow; ``LoadImage`` lists the uploaded
inputs, as ComfyUI lists its input folder."""

from __future__ import annotations

from typing import Any


def _node(
    name: str, category: str, required: dict[str, Any], output: list[str], output_node: bool = False
) -> dict[str, Any]:
    return {
        "input": {"required": required},
        "input_order": {"required": list(required)},
        "output": output,
        "output_is_list": [False] * len(output),
        "output_name": output,
        "name": name,
        "display_name": name,
        "description": "",
        "python_module": "nodes",
        "category": category,
        "output_node": output_node,
    }


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
    }
