"""Nebula Lab v4: getToken, text2imageSubmit, img2imgSubmit and the image task query."""
