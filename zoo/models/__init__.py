"""Model families, one file each; importing them registers their models in timm."""
