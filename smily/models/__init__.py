"""Model tools people run (`smily model export|quantize`); no service image needs them."""
