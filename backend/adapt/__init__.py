"""Adapting the served model from labelled examples (issue 13).

``examples``: chips cut from a raster around labelled points and over labelled polygons (client side, no
torch); ``split``: the validation split by example (polygon); ``metrics``: held-out accuracy and confusion;
``store``: the server's adapter folder; ``job``: the ``train`` operation (server side).
"""
