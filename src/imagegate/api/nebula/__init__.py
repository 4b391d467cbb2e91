"""The Nebula v1 image API: /v1/images/generations in the {code,msg,data} envelope."""
