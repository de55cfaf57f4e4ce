"""Pictures of the study: interpretation (CAM, Grad-CAM, Deconvnet, filters, feature maps),
embeddings, the course's toy decision boundaries, training curves, and the HTML report."""
