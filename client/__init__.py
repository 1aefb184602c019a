"""Hospital side: the Flower ClientApp and (later) the site daemon."""
