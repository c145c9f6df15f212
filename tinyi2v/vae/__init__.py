"""Video VAEs in numpy: LTX-Video's encoder/decoder and the Turbo-VAED decoder."""
