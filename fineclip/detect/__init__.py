"""Open-vocabulary detection on a frozen fineclip backbone (F-ViT), built from torchvision's Faster R-CNN parts."""
