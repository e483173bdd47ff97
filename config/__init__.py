"""blobchain.config"""
