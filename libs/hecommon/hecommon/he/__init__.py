"""The scheme (DESIGN §2–§3): parameter sets, the ring, keys and sampling, encryption and
decryption, the server's product, quantization and the exactness bound, with the compiled client
loops and the GPU product. Nothing here imports the wire format or the broker runtime
(``tests/test_layering.py``).

``bits.PackedRows`` (values of ``k`` bits, packed) is the scheme's own compact form of switched
values: the evaluator keeps each owner's switched ``a`` that way and the client holds it so; the
wire format uses the same packing as its array codec.
"""
