"""Image transforms: the training augmentation per image through albumentations or
torchvision (`augment`), the same distributions on whole batches on the training device
(`batched_augment`), and the CIFAR-10-C-style corruptions of the shift stage
(`corruptions`).

May import: `errors`, `config`, `compute.device`.
"""
