"""Processing provider: classify / localize / rank over whole raster layers."""
