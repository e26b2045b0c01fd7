-- placeOrder by trusted document: {"documentId": "sha256:...", "variables": ...}, one
-- customer and one product as place_order_one.lua, against a server whose trusted
-- documents manifest holds the document.
dofile(os.getenv("WRK_LIB"))
